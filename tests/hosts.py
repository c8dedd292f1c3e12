"""Separate network hosts on this machine, for MPI jobs across hosts (tests/train/test_hosts.py).

``NetHosts(n)`` makes n + 1 network namespaces: a login node that runs mpirun and holds a
bridge, and n hosts, each with its own address on the bridge (a veth pair: ``eth0`` in the
host, the other end on the bridge) and its own host name (``unshare --uts`` + ``hostname``:
Open MPI treats two hosts of one name as one node). Nothing is added to this machine's own
network namespace. Open MPI starts its daemon on a host through a launch agent that runs
``ip netns exec HOST ...`` where it would run ssh. Every namespace gives up on an
unanswered TCP connection after about 13 s (``net.ipv4.tcp_retries2 = 5``, as on a cluster
tuned to notice a lost node), so the daemons of a host cut off end. Names and the subnet are
unique per process and call; ``close()`` (also at exit) kills what still runs in the
namespaces and deletes them.

The hosts share this machine's file system (the shared file system of a cluster), process
table and /dev/shm: ``--mca btl tcp,self`` is what keeps MPI's messages on the network.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_made = itertools.count()


def why_not() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (iproute2 / util-linux)"
    return None


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _net_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class NetHosts:
    """n hosts ``names[i]`` at ``addresses[i]`` on ``subnet``; see the module docstring."""

    def __init__(self, n: int, workdir: Path) -> None:
        k = next(_made)
        tag = f"{os.getpid() % 100000}{k}"
        self.names = [f"hg{tag}h{i}" for i in range(n)]
        self.login = f"hg{tag}login"
        # 10.A.B.0/24 with A in 200..249 and B from the pid: unique beside other test runs
        octets = (200 + (os.getpid() // 256 + k) % 50, os.getpid() % 256)
        self.prefix = f"10.{octets[0]}.{octets[1]}"
        self.subnet = f"{self.prefix}.0/24"
        self.addresses = [f"{self.prefix}.{i + 1}" for i in range(n)]
        self.workdir = workdir
        self.made: list[str] = []
        atexit.register(self.close)
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        login = self.login
        _run("ip", "netns", "add", login)
        self.made.append(login)
        _run("ip", "-n", login, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", login, "addr", "add", f"{self.prefix}.254/24", "dev", "br0")
        for dev in ("br0", "lo"):
            _run("ip", "-n", login, "link", "set", dev, "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addresses, strict=True)):
            _run("ip", "netns", "add", name)
            self.made.append(name)
            _run("ip", "-n", login, "link", "add", f"h{i}", "type", "veth", "peer", "name",
                 "eth0", "netns", name)  # fmt: skip
            _run("ip", "-n", login, "link", "set", f"h{i}", "master", "br0", "up")
            _run("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
        for name in [login, *self.names]:
            _run("ip", "netns", "exec", name, "sh", "-c",
                 "echo 5 > /proc/sys/net/ipv4/tcp_retries2")  # fmt: skip
        cases = "\n".join(
            f"  {addr}) ns={name};;" for name, addr in zip(self.names, self.addresses, strict=True)
        )
        self.agent = self.workdir / "netns-agent.sh"
        self.agent.write_text(
            "#!/bin/sh\n# in place of ssh: AGENT HOST COMMAND... runs COMMAND on HOST\n"
            f'host=$1; shift\ncase "$host" in\n{cases}\n'
            '  *) echo "netns-agent: unknown host $host" >&2; exit 1;;\nesac\n'
            "# not exec: this shell stays on the login node, as ssh does\n"
            'ip netns exec "$ns" unshare --uts sh -c "hostname $ns; $*"\n'
        )
        self.agent.chmod(0o755)

    def on_login(self, cmd: list[str]) -> list[str]:
        """``cmd`` run on the login node (the same process: Popen's pid is cmd's)."""
        return ["ip", "netns", "exec", self.login, "unshare", "--uts", "sh", "-c",
                f'hostname {self.login}; exec "$@"', "sh", *cmd]  # fmt: skip

    def hostfile(self, slots: int) -> Path:
        path = self.workdir / f"hostfile{slots}"
        path.write_text("".join(f"{a} slots={slots}\n" for a in self.addresses))
        return path

    def mpirun_args(self, slots: int, keepalive_s: int = 10) -> list[str]:
        """mpirun's options for ``slots`` ranks on every host, over TCP on the link only.
        ``--leave-session-attached`` keeps the daemons' stderr (else /dev/null), where a rank
        writes the message of a lost peer (handgrad.distributed.mpi.launcher_stderr). The
        launcher's own connections to its daemons probe a silent link every 2 s after
        ``keepalive_s`` idle seconds (3 probes): a host cut off ends the job."""
        n = slots * len(self.names)
        return [
            "--hostfile", str(self.hostfile(slots)), "-n", str(n), "--map-by", "node",
            "--leave-session-attached",
            "--mca", "plm_rsh_agent", str(self.agent),
            "--mca", "btl", "tcp,self",
            "--mca", "btl_tcp_if_include", self.subnet,
            "--mca", "oob_tcp_if_include", self.subnet,
            "--prtemca", "oob_tcp_keepalive_time", str(keepalive_s),
            "--prtemca", "oob_tcp_keepalive_intvl", "2",
            "--prtemca", "oob_tcp_keepalive_probes", "3",
            "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
        ]  # fmt: skip

    def links_up(self) -> None:
        """Bring every host's link back up (after a test cut one)."""
        for name in self.names:
            subprocess.run(["ip", "-n", name, "link", "set", "eth0", "up"], capture_output=True)

    def pids(self, host: str) -> list[int]:
        """The processes running on ``host`` (in its network namespace)."""
        try:
            out = subprocess.run(
                ["ip", "netns", "pids", host], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        alive = []
        for pid in map(int, out.split()):
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
        return alive

    def wait_empty(self, seconds: float) -> dict[str, list[int]]:
        """Wait up to ``seconds`` for every host to have no process; what is left."""
        deadline = time.monotonic() + seconds
        while True:
            left = {h: p for h in self.names if (p := self.pids(h))}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def close(self) -> None:
        for name in self.made:
            for pid in self.pids(name):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made = []
