"""A watchdog for jobs of ranks on several hosts: MPI collectives have no timeout, so a rank
whose peer stopped answering (its host lost, its link cut, its process stalled) would wait in
its next collective forever. ``Watchdog`` ends the job instead, with one message naming the
rank and host that failed.

Each rank keeps a TCP connection to rank 0 (a star, beside MPI's own connections) over
which a thread sends a heartbeat every second. Rank 0's watchdog thread ends the job
(``end(message)``, MPI_Abort under MPI) when

    a peer's connection closes without a goodbye      its process or host died: at once
    a peer sends nothing for ``timeout`` seconds      its host stalled or its link is cut
    this rank makes no progress for ``timeout`` seconds beyond the usual time between two
        ``progress()`` marks (the slowest of the last 20), outside ``paused()``

and the other ranks do the same when rank 0's connection closes or falls silent (the rank 0
of a lost host cannot say it). Whatever ends the job first sends every peer a goodbye, so
one message is printed; ``record(message)``, given, keeps it too (training writes it to the
run directory: a launcher that lost a host's daemon ends the job at once, and the surviving
ranks' output may never reach it). ``hosts(group)`` gathers every rank's host name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from handgrad.distributed.transport import Transport

HEARTBEAT_S = 1.0  # seconds between two heartbeats
CONNECT_S = 20.0  # how long rank 0 waits for its peers' heartbeat connections
_SIOCGIFADDR = 0x8915
_BLOB = 1024  # bytes of the broadcast that tells the peers where rank 0 listens


def hosts(group: Transport) -> list[str]:
    """Every rank's host name, in rank order (one all-gather)."""
    name = socket.gethostname().encode()[:255]
    mine = np.zeros(256, np.uint8)
    mine[: len(name)] = np.frombuffer(name, np.uint8)
    every = np.zeros(256 * group.world_size, np.uint8)
    group.all_gather(every, mine)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every.reshape(-1, 256)]


def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (Linux's SIOCGIFADDR; loopback elsewhere)."""
    found = []
    with contextlib.suppress(OSError, AttributeError, ImportError):
        import fcntl

        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(
                        s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
                    )
                except OSError:
                    continue
                found.append(socket.inet_ntoa(packed[20:24]))
    return sorted(set(found), key=lambda a: (a.startswith("127."), a)) or ["127.0.0.1"]


def _send(sock: socket.socket, line: str) -> bool:
    """Send without blocking (a stalled peer must not stall this thread); False if broken."""
    try:
        sock.send(line.encode(), getattr(socket, "MSG_DONTWAIT", 0))
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True


class Watchdog:
    """See the module docstring. ``end(message)`` must end this process's job (it is called
    from the watchdog's thread, once); ``record(message)``, if given, is called first;
    ``timeout`` <= 0 turns the watchdog off."""

    def __init__(
        self,
        group: Transport,
        timeout: float,
        end: Callable[[str], None],
        host_names: list[str] | None = None,
        record: Callable[[str], None] | None = None,
    ) -> None:
        self.group, self.timeout, self._end = group, float(timeout), end
        self._record = record
        self.rank, self.world = group.rank, group.world_size
        self.hosts = host_names or hosts(group)
        self.lock = threading.Lock()
        self.last_mark = self.tick = time.monotonic()
        self.gaps: deque[float] = deque(maxlen=20)
        self.pause_depth, self.closing, self.saw_end = 0, False, False
        self.heard: dict[int, float] = {}
        self.lost: dict[int, str] = {}  # peer -> how its connection ended
        self.done: set[int] = set()  # peers that said goodbye
        self.conns: dict[int, socket.socket] = {}
        self._stop, self._wake = threading.Event(), threading.Event()
        if self.timeout <= 0 or self.world < 2:
            return
        self._connect()
        for peer, sock in self.conns.items():
            self.heard[peer] = time.monotonic()
            threading.Thread(target=self._read, args=(peer, sock), daemon=True).start()
        threading.Thread(target=self._beat, daemon=True, name="heartbeat").start()
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    # -- the heartbeat connections ------------------------------------------------------

    def _connect(self) -> None:
        blob = np.zeros(_BLOB, np.uint8)
        server = None
        if self.rank == 0:
            server = socket.create_server(("", 0))
            token = os.urandom(8).hex()
            addrs = local_addresses()[:40]  # 40 fit in the broadcast's 1,024 bytes
            where = {"port": server.getsockname()[1], "token": token, "addrs": addrs}
            raw = json.dumps(where).encode()[:_BLOB]
            blob[: len(raw)] = np.frombuffer(raw, np.uint8)
        self.group.broadcast(blob, src=0)
        where = json.loads(bytes(blob).rstrip(b"\0").decode())
        if server is not None:
            server.settimeout(1.0)
            deadline = time.monotonic() + CONNECT_S
            while len(self.conns) < self.world - 1 and time.monotonic() < deadline:
                try:
                    sock, _ = server.accept()
                    sock.settimeout(5.0)
                    hello = sock.recv(64).decode().split()
                except OSError:
                    continue
                if len(hello) == 2 and hello[0] == where["token"] and hello[1].isdigit():
                    sock.settimeout(None)
                    self.conns[int(hello[1])] = sock
                else:
                    sock.close()
            server.close()
        else:
            for addr in where["addrs"]:
                try:
                    sock = socket.create_connection((addr, where["port"]), timeout=5.0)
                except OSError:
                    continue
                sock.sendall(f"{where['token']} {self.rank}\n".encode())
                sock.settimeout(None)
                self.conns[0] = sock
                break
        missing = np.zeros(1)
        missing[0] = (self.world - 1 if self.rank == 0 else 1) - len(self.conns)
        self.group.all_reduce(missing)
        if missing[0]:  # stalls are still caught; a peer that fails is not named
            if self.rank == 0:
                sys.stderr.write(
                    f"handgrad: warning: {int(missing[0])} rank(s) could not reach rank 0 at "
                    f"{where['addrs']} port {where['port']} for heartbeats; a failed rank will "
                    "end the job without being named\n"
                )
            for sock in self.conns.values():
                sock.close()
            self.conns = {}

    def _read(self, peer: int, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(4096)
            except OSError as err:
                data, why = b"", f"its connection broke ({err.strerror or err})"
            else:
                why = "its process ended (connection closed)"
            if not data:
                with self.lock:
                    if peer not in self.done:
                        self.lost.setdefault(peer, why)
                self._wake.set()  # a lost peer ends the job at once
                return
            buf += data
            with self.lock:
                self.heard[peer] = time.monotonic()
                if b"bye" in buf:
                    self.done.add(peer)
            buf = buf[-16:]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for sock in list(self.conns.values()):
                _send(sock, "hb\n")

    # -- progress -----------------------------------------------------------------------

    def progress(self) -> None:
        """This rank got past a point of its step (each step marks the same points)."""
        now = time.monotonic()
        with self.lock:
            if self.pause_depth == 0:
                self.gaps.append(now - self.last_mark)
            self.last_mark = now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work of no usual length (evaluation, a checkpoint): only a peer lost or silent
        ends the job meanwhile."""
        with self.lock:
            self.pause_depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.pause_depth -= 1
                self.last_mark = time.monotonic()

    def _who(self, peers: list[int]) -> str:
        by_host: dict[str, list[int]] = {}
        for p in sorted(peers):
            by_host.setdefault(self.hosts[p], []).append(p)
        return "; ".join(
            f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} of {self.world} (host {h})"
            for h, r in by_host.items()
        )

    def check(self) -> str | None:
        """The message to end the job with, or None while all is well."""
        now = time.monotonic()
        if self._asleep(now):  # this process was stopped: it is the one that stalled
            return None
        with self.lock:
            watched = [p for p in self.conns if p not in self.done]
            lost = {p: why for p, why in self.lost.items() if p in watched}
            silent = [p for p in watched if p not in lost and now - self.heard[p] > self.timeout]
            usual = max(self.gaps, default=0.0)
            stalled = self.pause_depth == 0 and now - self.last_mark > usual + self.timeout
            waited = now - self.last_mark
        self.saw_end = bool(lost)
        if lost:
            why = "; ".join(sorted(set(lost.values())))
            return f"{self._who(list(lost))} failed: {why}"
        if silent:
            quiet = max(now - self.heard[p] for p in silent)
            return (
                f"{self._who(silent)} failed: no heartbeat for {quiet:.1f} s (host stalled, "
                f"link cut or process stopped; [train] collective_timeout = {self.timeout:g} s)"
            )
        if stalled and self.rank == 0:  # every peer still beats: name them all, rank 0 last
            return (
                f"{self._who(list(range(1, self.world)))} failed: no progress for {waited:.1f} "
                f"s, {waited - usual:.1f} s beyond the usual {usual:.1f} s between two points "
                f"of a step ([train] collective_timeout = {self.timeout:g} s); rank 0 of "
                f"{self.world} (host {self.hosts[0]}) is waiting on them"
            )
        return None

    def _probe(self) -> None:
        """Look at each connection now for an end the reader thread has not seen yet."""
        for peer, sock in list(self.conns.items()):
            try:
                ended = sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
            except BlockingIOError:
                continue
            except OSError:
                ended = True
            with self.lock:
                if ended and peer not in self.done:
                    self.lost.setdefault(peer, "its process ended (connection closed)")

    def catch_sigterm(self) -> None:
        """Call from the main thread. A launcher that lost a host first ends the other ranks
        with SIGTERM, before their watchdog can speak: this rank then prints the message
        naming the lost rank and exits 1 (any other SIGTERM ends it as before)."""
        if not self.conns:
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self._probe()
            message = None if self.closing else self.check()
            if message is not None:
                self.close()
                self.record(message)
                sys.stderr.write(f"handgrad: {message}; the launcher ended this rank\n")
                sys.stderr.flush()
                os._exit(1)
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)

    def _asleep(self, now: float) -> bool:
        """Whether the watchdog's thread did not run for a while (this process stopped)."""
        return now - self.tick > max(2.0, self.timeout / 2)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.25)
            now = time.monotonic()
            if self._asleep(now):  # woken: give the peers' lines time to arrive first
                with self.lock:
                    self.heard = dict.fromkeys(self.heard, now)
            self.tick = now
            message = self.check()
            if message is not None and not self.closing:
                self.close()
                self.record(message)
                self._end(f"handgrad: {message}; ending the job")
                return

    def record(self, message: str) -> None:
        """Hand ``message`` to ``record`` (a file beside the run: the output of a rank whose
        launcher is tearing the job down may never be printed): on rank 0, or where a peer's
        connection closed. A rank that only stopped hearing rank 0 may be the one cut off."""
        if self._record is not None and (self.rank == 0 or self.saw_end):
            with contextlib.suppress(Exception):
                self._record(message)

    def close(self) -> None:
        """Stop watching; say goodbye to the peers (so they do not report this rank)."""
        if not self.conns or self.closing:
            return
        self.closing = True
        self._stop.set()
        self._wake.set()
        for sock in self.conns.values():
            _send(sock, "bye\n")
