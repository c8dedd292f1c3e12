"""The ``local`` transport: ranks are processes forked on one machine, talking through one
anonymous shared mapping and two semaphores; no launcher.

Rank 0 is the process that creates the group; ``start(worker)`` forks ranks 1 .. P-1, each
of which runs ``worker(transport)`` and exits. The mapping holds a small header (who failed,
and why), one slot of ``capacity`` bytes per rank and one result area of the same size.
Every collective has the shape

    each rank writes its input into its own slot          (in parallel)
    barrier
    rank r reduces (or copies) its 1/P of the data        (in parallel)
    barrier
    each rank copies out what it needs

so no rank reads a slot before it is written or writes one that is still being read: slots
are written only before a collective's first barrier and read only between its two, the
result area written only between them and read only after the second. Arrays larger than
a slot go through in pieces. Sums add the slots in rank order (slot 0 + slot 1 + ...), so
results are bit for bit the same from run to run.

The barrier is a counter under a lock and two alternating semaphores (barrier k uses
semaphore k mod 2: a rank can only reach barrier k + 2 after every rank has left barrier k,
so tokens of one never leak into the other). Waits time out every 0.1 s to look for
failures:

- a rank that raises records its rank and traceback in the header and wakes everyone; the
  others raise ``ProcessGroupError`` naming it;
- rank 0 watches its children's exit codes: one that ended (killed, out of memory) is
  recorded the same way;
- a worker whose parent has gone exits at once: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on
  Linux, and, where prctl is missing, a thread blocked on a pipe whose write end only rank 0
  holds (the worker closes its inherited copy), which reads end-of-file when rank 0 ends.

Workers ignore SIGINT: Ctrl-C reaches rank 0, whose exit (or ``close()``) ends them all.
Needs the ``fork`` start method (Linux; macOS untested).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from handgrad.distributed.transport import (
    ProcessGroupError,
    Transport,
    check_array,
    check_rank_count,
    check_scatter_sizes,
)

_ALIGN = 64  # bytes: each shared array starts on a cache line
_ERROR_BYTES = 1 << 16  # room for one traceback
# int64: failed flag, failed rank, message length, exit code, 2 barrier counters, closed
_HEADER_WORDS = 8
_POLL_S = 0.1  # how often a waiting rank looks for failures
DEFAULT_CAPACITY = 32 << 20  # bytes per rank slot (a 25 MB bucket at once); more in pieces
_PR_SET_PDEATHSIG = 1
# exit code a worker uses when it stops because another rank failed (it reports nothing)
_EXIT_PEER_FAILED = 3
use_pdeathsig = True  # tests turn it off to check the pipe alone ends an orphaned worker


def can_fork() -> bool:
    """Whether this platform has the ``fork`` start method the local transport needs."""
    return "fork" in mp.get_all_start_methods()


class SharedArrays:
    """Arrays of given shapes and dtypes laid out in one anonymous shared mapping, which
    processes forked afterwards see (and write) as the same memory."""

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], Any]]) -> None:
        offsets, end = [], 0
        for shape, dtype in specs:
            end = -(-end // _ALIGN) * _ALIGN
            offsets.append(end)
            end += math.prod(shape) * np.dtype(dtype).itemsize
        self._map = mmap.mmap(-1, max(end, 1))  # anonymous + MAP_SHARED: shared with children
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self.arrays = [
            raw[o : o + math.prod(shape) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
            for o, (shape, dtype) in zip(offsets, specs)
        ]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"exited, killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"exited, killed by signal {-code}"
    return f"exited with code {code}"


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent ends; exit now if it already has."""
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the pipe below still ends the worker
    if os.getppid() != parent_pid:  # the parent ended before prctl took effect
        os._exit(1)


def _watch_pipe(fd: int) -> None:
    """Block until every write end of the pipe is closed (rank 0 has ended), then exit."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os._exit(1)


class LocalTransport(Transport):
    """Collectives between ``world_size`` forked processes over shared memory.

    Create it in the process that becomes rank 0, then ``start(worker)`` to fork the other
    ranks. With ``world_size`` 1 every collective is a no-op (a one-process group)."""

    name = "local"

    def __init__(self, world_size: int, capacity: int = DEFAULT_CAPACITY) -> None:
        check_rank_count(world_size)
        if world_size > 1 and not can_fork():
            raise RuntimeError(
                "the local transport forks its ranks, and this platform has no fork start "
                "method; use world size 1 or the mpi transport"
            )
        self.rank, self.world_size = 0, world_size
        # whole elements of any dtype (<= 16 bytes), and one of each rank per reduce_scatter piece
        self.capacity = max(16 * world_size, capacity // 16 * 16)
        self.processes: list[Any] = []  # rank r's process at index r - 1 (rank 0 only)
        self._closed = False
        self._pipe_w: int | None = None
        self._parent_pid = os.getpid()
        if world_size == 1:
            return
        ctx = mp.get_context("fork")
        self._lock = ctx.Lock()
        self._sems = (ctx.Semaphore(0), ctx.Semaphore(0))
        self._generation = 0
        shared = SharedArrays(
            [
                ((_HEADER_WORDS,), np.int64),
                ((_ERROR_BYTES,), np.uint8),
                ((world_size + 1, self.capacity), np.uint8),
            ]
        )
        self._shared = shared
        self._header, self._error, self._slots = shared.arrays

    # ---- start-up and shut-down
    def start(self, worker: Callable[[LocalTransport], Any], name: str = "handgrad-rank") -> None:
        """Fork ranks 1 .. P-1; each runs ``worker(transport)`` (this transport, seen from
        its rank) and exits: code 0 when it returns, 1 after recording its error."""
        if self.rank != 0 or self.processes or self.world_size == 1:
            raise RuntimeError("start(): only once, on rank 0 of a group of 2 or more")
        ctx = mp.get_context("fork")
        read_fd, self._pipe_w = os.pipe()
        try:
            for rank in range(1, self.world_size):
                proc = ctx.Process(
                    target=self._worker_main,
                    args=(rank, worker, read_fd),
                    daemon=True,
                    name=f"{name}{rank}",
                )
                proc.start()
                self.processes.append(proc)
        finally:
            os.close(read_fd)

    def _worker_main(self, rank: int, worker: Callable[[LocalTransport], Any], fd: int) -> None:
        os.close(self._pipe_w)  # only rank 0 may hold the write end open
        self._pipe_w = None
        _die_with_parent(self._parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=_watch_pipe, args=(fd,), daemon=True).start()
        self.rank, self.processes = rank, []
        try:
            worker(self)
        except ProcessGroupError:
            sys.exit(_EXIT_PEER_FAILED)  # another rank failed first and reports it
        except BaseException:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
            self.abort(traceback.format_exc())
            sys.exit(1)

    def close(self) -> None:
        """On rank 0: mark the group closed (a worker still waiting in a collective stops),
        give the workers up to 10 s to return, then close this end of their pipe (which
        ends any that are left) and terminate whatever still runs after 5 s more."""
        if self._closed:
            return
        self._closed = True
        if self.rank != 0 or self.world_size == 1:
            return
        self._header[6] = 1
        for proc in self.processes:
            proc.join(timeout=10)
        if self._pipe_w is not None:
            os.close(self._pipe_w)
            self._pipe_w = None
        for proc in self.processes:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    # ---- failures
    def failure(self) -> ProcessGroupError | None:
        """The recorded failure of some rank, if any."""
        if self.world_size == 1 or not self._header[0]:
            return None
        n = int(self._header[2])
        detail = self._error[:n].tobytes().decode("utf-8", "replace")
        exitcode = None if self._header[0] == 1 else int(self._header[3])
        return ProcessGroupError(int(self._header[1]), detail, exitcode)

    def _record(self, rank: int, detail: str, exitcode: int | None = None) -> None:
        got = self._lock.acquire(timeout=5)  # a rank killed holding it must not block this
        try:
            if not self._header[0]:
                data = detail.encode("utf-8", "replace")[-_ERROR_BYTES:]
                self._error[: len(data)] = np.frombuffer(data, dtype=np.uint8)
                self._header[1:4] = rank, len(data), exitcode or 0
                self._header[0] = 1 if exitcode is None else 2
        finally:
            if got:
                self._lock.release()
        for sem in self._sems:  # wake every waiter; the group is broken from now on
            for _ in range(self.world_size):
                sem.release()

    def abort(self, detail: str) -> None:
        if self.world_size > 1 and not self._closed:
            self._record(self.rank, detail)

    def _check(self) -> None:
        if self.rank == 0:
            for rank, proc in enumerate(self.processes, start=1):
                code = proc.exitcode
                if code is not None:
                    self._record(rank, _exit_text(code), exitcode=code)
        elif os.getppid() != self._parent_pid:
            os._exit(1)
        elif self._header[6]:
            raise ProcessGroupError(0, "rank 0 closed the group while this rank waited")
        err = self.failure()
        if err is not None:
            raise err

    def _barrier(self) -> None:
        if self._closed:
            raise RuntimeError("the process group is closed")
        g = self._generation
        self._generation ^= 1
        while not self._lock.acquire(timeout=_POLL_S):
            self._check()
        try:
            self._header[4 + g] += 1
            last = self._header[4 + g] == self.world_size
            if last:
                self._header[4 + g] = 0
        finally:
            self._lock.release()
        if last:
            for _ in range(self.world_size - 1):
                self._sems[g].release()
        else:
            try:
                while not self._sems[g].acquire(timeout=_POLL_S):
                    self._check()
            except (KeyboardInterrupt, SystemExit):
                # this rank leaves mid-barrier: the count is off for good, so break the group
                # (the others stop) rather than let close() talk over a desynchronised one
                self._record(self.rank, "interrupted while waiting in a collective")
                raise
        err = self.failure()
        if err is not None:
            raise err

    # ---- collectives
    def _slot(self, i: int, dtype: np.dtype, n: int) -> np.ndarray:
        return self._slots[i, : n * dtype.itemsize].view(dtype)

    def _pieces(self, size: int, itemsize: int, ways: int = 1) -> range:
        return range(0, size, max(1, self.capacity // (itemsize * ways)))

    def _segment(self, n: int) -> slice:
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def _reduce_into(self, out: np.ndarray, parts: list[np.ndarray], op: str) -> None:
        fn = np.maximum if op == "max" else np.add
        fn(parts[0], parts[1], out=out)
        for part in parts[2:]:
            fn(out, part, out=out)
        if op == "avg":
            out /= self.world_size

    def _reduce(self, array: Any, op: str, dst: int | None, what: str) -> None:
        if self.world_size == 1:
            return
        flat, P = array.reshape(-1), self.world_size
        for start in self._pieces(flat.size, flat.itemsize):
            part = flat[start : start + self.capacity // flat.itemsize]
            n = part.size
            self._slot(self.rank, flat.dtype, n)[...] = part
            self._barrier()
            seg = self._segment(n)
            parts = [self._slot(i, flat.dtype, n)[seg] for i in range(P)]
            self._reduce_into(self._slot(P, flat.dtype, n)[seg], parts, op)
            self._barrier()
            if dst is None or dst == self.rank:
                part[...] = self._slot(P, flat.dtype, n)

    def broadcast(self, array: Any, src: int = 0) -> None:
        check_array(array, "broadcast")
        self.check_rank(src, "broadcast")
        if self.world_size == 1:
            return
        flat = array.reshape(-1)
        for start in self._pieces(flat.size, flat.itemsize):
            part = flat[start : start + self.capacity // flat.itemsize]
            if self.rank == src:
                self._slot(src, flat.dtype, part.size)[...] = part
            self._barrier()
            if self.rank != src:
                part[...] = self._slot(src, flat.dtype, part.size)
            self._barrier()

    def reduce_scatter(self, output: Any, input: Any) -> None:
        n = check_scatter_sizes(output, input, self.world_size, "reduce_scatter")
        P = self.world_size
        if P == 1:
            output.reshape(-1)[...] = input.reshape(-1)
            return
        src, out = input.reshape(P, n), output.reshape(-1)
        for start in self._pieces(n, out.itemsize, P):
            stop = min(n, start + self.capacity // (out.itemsize * P))
            k = stop - start
            self._slot(self.rank, out.dtype, P * k).reshape(P, k)[...] = src[:, start:stop]
            self._barrier()
            parts = [self._slot(i, out.dtype, P * k).reshape(P, k)[self.rank] for i in range(P)]
            self._reduce_into(out[start:stop], parts, "sum")
            self._barrier()

    def all_gather(self, output: Any, input: Any) -> None:
        n = check_scatter_sizes(output, input, self.world_size, "all_gather")
        P = self.world_size
        if P == 1:
            output.reshape(-1)[...] = input.reshape(-1)
            return
        src, out = input.reshape(-1), output.reshape(P, n)
        for start in self._pieces(n, src.itemsize):
            stop = min(n, start + self.capacity // src.itemsize)
            self._slot(self.rank, src.dtype, stop - start)[...] = src[start:stop]
            self._barrier()
            for i in range(P):
                out[i, start:stop] = self._slot(i, src.dtype, stop - start)
            self._barrier()

    def barrier(self) -> None:
        if self.world_size > 1:
            self._barrier()
