"""``handgrad train`` on 2 network hosts x 1 and x 2 MPI ranks, over TCP only, and the loss
of a host: its processes killed, its link cut, its training stalled.

The hosts are network namespaces (tests/hosts.py) that see one file system, as a cluster's
shared file system: the run directory is one path every host sees, written by rank 0 alone.
A failure ends the job within 30 s with one message naming the rank and host that failed,
leaves ``latest`` naming the last complete checkpoint and no process on either host; the run
then resumes on one host from that path and continues to the bit as if nothing happened.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from hosts import REPO, NetHosts, why_not  # noqa: E402  (tests/hosts.py)
from test_train_mpi import CONFIG, files, losses, one_process, val_losses  # noqa: E402

STEPS, EVERY, FAULT_AT = 12, 5, 8  # the fault strikes during step 8: latest is step 5
TIMEOUT_S = 4  # [train] collective_timeout of the fault runs (the default is 10 s)
pytestmark = [pytest.mark.alone, pytest.mark.usefixtures("alone")]


def _mpirun() -> str:
    if reason := why_not():
        pytest.skip(f"no network hosts: {reason}")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'handgrad[mpi]')")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("mpirun", path=path)
    if found is None:
        pytest.skip("no mpirun (pip install 'handgrad[mpi]' brings Open MPI's)")
    return found


@pytest.fixture(scope="module")
def hosts(alone, tmp_path_factory):
    mpirun = _mpirun()
    try:
        made = NetHosts(2, tmp_path_factory.mktemp("hosts"))
    except OSError as err:  # a container without CAP_NET_ADMIN, no bridge support ...
        pytest.skip(f"network namespaces cannot be made here: {err}")
    made.mpirun = mpirun
    try:
        yield made
    finally:
        made.close()


def on_hosts(hosts, *args: str, slots: int = 1, fault: str | None = None, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    faults = ["--fault", fault] if fault else []
    cmd = [hosts.mpirun, *hosts.mpirun_args(slots), sys.executable, str(HERE / "mpi_train.py"),
           *faults, "--", "train", *args, "--no-progress"]  # fmt: skip
    cmd = hosts.on_login(cmd)
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        left = hosts.wait_empty(20)
        hosts.close_left = left
        for pids in left.values():  # a failed test leaves nothing for the next one
            for pid in pids:
                os.kill(pid, 9)
        hosts.links_up()


@pytest.fixture(scope="module")
def config(tmp_path_factory, data_dir) -> Path:
    path = tmp_path_factory.mktemp("hosts_config") / "tiny.toml"
    text = CONFIG.format(source=data_dir).replace("max_steps = 30", f"max_steps = {STEPS}")
    path.write_text(text.replace("checkpoint_interval = 15", f"checkpoint_interval = {EVERY}"))
    return path


@pytest.fixture(scope="module")
def full(hosts, config, tmp_path_factory) -> Path:
    """The run on 2 hosts x 1 rank, uninterrupted."""
    run = tmp_path_factory.mktemp("full") / "run"
    done = on_hosts(hosts, str(config), "--out", str(run))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert hosts.close_left == {}, out
    # the start line: hosts, ranks per host, transport (TCP only, on the link's subnet)
    a, b = hosts.names
    line = f"2 hosts: {a} (rank 0), {b} (rank 1); transport mpi (Open MPI"
    assert out.count(line) == 1, out
    assert f"btl tcp,self, btl_tcp_if_include {hosts.subnet}" in out, out
    assert "collective timeout 10 s" in out, out
    return run


def test_two_hosts_train_like_one_process(full, config, tmp_path):
    one = tmp_path / "one"
    one_process(str(config), "--out", str(one), "--set", "train.micro_batch_size=8")
    assert sorted(losses(full)) == list(range(1, STEPS + 1))
    for step, loss in losses(one).items():
        assert losses(full)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    for step, loss in val_losses(one).items():
        assert val_losses(full)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    assert (full / "latest").read_text().strip() == f"checkpoints/step_{STEPS:07d}"


def test_two_hosts_of_two_ranks_train_like_one_process(hosts, config, tmp_path):
    run, one = tmp_path / "run", tmp_path / "one"
    done = on_hosts(hosts, str(config), "--out", str(run), "--set", "train.max_steps=4",
                    slots=2)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    a, b = hosts.names
    assert (
        f"4 MPI ranks x 4 windows per micro batch; 2 hosts: {a} (ranks 0, 2), {b} (ranks 1, 3)"
        in out
    )
    one_process(str(config), "--out", str(one), "--set", "train.micro_batch_size=16",
                "--set", "train.max_steps=4")  # fmt: skip
    for step, loss in losses(one).items():
        assert losses(run)[step] == pytest.approx(loss, rel=1e-5, abs=0), step


def resumed_like_full(run: Path, full: Path) -> None:
    """``run`` resumed on one host from ``latest`` continues to the bit as ``full`` did."""
    one_process("--resume", str(run), "--set", f"train.max_steps={STEPS}")
    assert losses(run) == losses(full)
    for name in ("model", "optimizer"):
        a, b = files(full, STEPS, name), files(run, STEPS, name)
        assert sorted(a) == sorted(b)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), name


# Every process of a host killed: a surviving rank's watchdog sees the dead rank's heartbeat
# connection close, and as the launcher is ending the job already (it saw its daemon go),
# writes its message to its daemon's stderr (kept by --leave-session-attached), which reaches
# mpirun's output. Its link cut or its training stopped: the watchdog hears no heartbeat for
# collective_timeout and ends the job itself (MPI_Abort(1)).
LAUNCHER = r"(Remote host|Remote daemon: \S+ on node):? +{host}\b"
NAMED = r"ranks? [\d, ]*\b(?:{rank})\b[\d, ]* of {n} \(host {host}\) failed: "
KILLED = "handgrad: " + NAMED + r"its process ended \(connection closed\); ending the job"
SILENT = "handgrad: " + NAMED + "no heartbeat for"


@pytest.mark.parametrize(
    "fault, rank, message, slots",
    [
        ("host-kill", 1, KILLED, 1),
        ("host-kill", 0, KILLED, 1),  # rank 0's host: mpirun's login node goes on
        ("link-down", 1, SILENT, 1),
        ("stop", 1, SILENT, 1),
        ("stop", 1, SILENT, 2),  # 2 hosts x 2 ranks: ranks 1 and 3 on the stalled host
    ],
    ids=["host-kill-1", "host-kill-0", "link-down-1", "stop-1", "2x2-stop-1"],
)
def test_a_lost_host_ends_the_job(
    hosts, full, config, tmp_path, capsys, fault, rank, message, slots
):
    run, n = tmp_path / "run", 2 * slots
    args = [str(config), "--out", str(run), "--set", f"train.collective_timeout={TIMEOUT_S}"]
    if slots > 1:  # the global batch of the 2 x 1 run, in 4 ranks' shares
        args += ["--set", "train.micro_batch_size=2"]
    started = time.time()
    done = on_hosts(hosts, *args, fault=f"{fault}:{FAULT_AT}:{rank}", slots=slots)
    end, out = time.time(), done.stdout + done.stderr
    if message is KILLED:  # Open MPI's message names the host; its mpirun exits with the
        # daemon's status, or 0 when it ended the job on losing the daemon's connection first
        assert len(re.findall(LAUNCHER.format(host=hosts.names[rank]), out)) == 1, out
        assert done.returncode != 0 or "PRTE has lost communication" in out, out
    else:  # handgrad's watchdog ends the job: MPI_Abort(1)
        assert done.returncode != 0, out
    struck = float(out.split(f"rank {rank} failing at ")[1].split()[0])
    assert started < struck and end - struck < 30, out
    host, who = hosts.names[rank], "|".join(str(r) for r in range(rank % 2, n, 2))
    ranks = ", ".join(str(r) for r in range(0, n, 2)), ", ".join(str(r) for r in range(1, n, 2))
    s = "s" if slots > 1 else ""
    where = f"2 hosts: {hosts.names[0]} (rank{s} {ranks[0]}), {hosts.names[1]} (rank{s} {ranks[1]})"
    assert where in out, out
    assert len(re.findall(message.format(host=host, rank=who, n=n), out)) == 1, out
    named = re.findall(r"handgrad: ranks? [\d, ]+ of \d+ \(host [^)]*\)", out)
    assert len(named) == 1, out  # one message
    assert hosts.close_left == {}, out  # no process left on either host
    assert "done:" not in out
    assert (run / "latest").read_text().strip() == f"checkpoints/step_{EVERY:07d}"
    # the surviving rank's message, kept beside the run: printed again by the next start
    failed = (run / "failed").read_text().strip()
    why = "its process ended" if message is KILLED else "no heartbeat for"
    assert re.fullmatch(NAMED.format(host=host, rank=who, n=n) + why + ".*", failed), failed
    capsys.readouterr()
    if slots == 1:
        resumed_like_full(run, full)
        assert f"the last job on this run ended: {failed}\n" in capsys.readouterr().err
        assert not (run / "failed").exists()
        return
    # 4 ranks sum the batch in another order than 2: the same losses within 1e-5, not bits
    one_process("--resume", str(run), "--set", f"train.max_steps={STEPS}")
    for step, loss in losses(full).items():
        assert losses(run)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    assert f"the last job on this run ended: {failed}\n" in capsys.readouterr().err
    assert not (run / "failed").exists()


def test_the_collective_timeout_is_a_config_key(tmp_path, config):
    from handgrad.train.config import ConfigError, load_config

    assert load_config(config).train.collective_timeout == 10.0
    cfg = load_config(config, overrides=["train.collective_timeout=2.5"])
    assert cfg.train.collective_timeout == 2.5
    with pytest.raises(ConfigError, match="collective_timeout"):
        load_config(config, overrides=["train.collective_timeout=-1"])


def test_val_loss_is_unchanged(full):  # evaluation runs paused under the watchdog
    assert sorted(val_losses(full)) == [10, STEPS]
    assert np.isfinite(list(val_losses(full).values())).all()
