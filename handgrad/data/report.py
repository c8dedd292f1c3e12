"""Progress of `data prepare` as people expect it on hours-long work: documents, text bytes and
tokens done, MB/s, an ETA where the input's size is known, and a summary at the end.

On a terminal this is a tqdm bar over the input bytes. Anywhere else (a log file, a CI job) it is
one plain line every `interval` seconds, never a flood of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

# Seconds between two progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts are cumulative over the whole preparation (a resumed one starts from its
    checkpoint's); rates and the ETA use this run's share only."""

    def __init__(
        self,
        enabled: bool,
        total_bytes: int | None,
        start: dict[str, int] | None = None,
        stream: TextIO | None = None,
        interval: float | None = None,
    ):
        self.enabled = enabled
        self.total = total_bytes
        self.stream = stream or sys.stderr
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.counts = dict(start or {"documents": 0, "text_bytes": 0, "tokens": 0, "input": 0})
        self.first = dict(self.counts)
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(
                desc="tokenizing",
                total=total_bytes,
                initial=self.counts["input"],
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=self.stream,
            )
        if enabled and self.counts["documents"]:
            self._print(f"resuming after {self._done()}")

    def _print(self, line: str) -> None:
        print(f"data prepare: {line}", file=self.stream, flush=True)

    def _done(self) -> str:
        c = self.counts
        return (
            f"{c['documents']:,} documents, {c['text_bytes'] / 1e6:,.1f} MB of text, "
            f"{c['tokens']:,} tokens"
        )

    def _rate(self) -> float:
        """This run's MB of text per second."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return (self.counts["text_bytes"] - self.first["text_bytes"]) / 1e6 / elapsed

    def _eta(self) -> str | None:
        if not self.total:
            return None
        done = self.counts["input"] - self.first["input"]
        elapsed = time.perf_counter() - self.t0
        if done <= 0:
            return None
        left = max(self.total - self.counts["input"], 0) * elapsed / done
        return f"{100 * self.counts['input'] / self.total:.0f}% of the input, ETA {_duration(left)}"

    def update(self, documents: int, text_bytes: int, tokens: int, input_bytes: int) -> None:
        """Add one chunk's counts (`input_bytes`: the source position, cumulative)."""
        c = self.counts
        c["documents"] += documents
        c["text_bytes"] += text_bytes
        c["tokens"] += tokens
        step = max(input_bytes - c["input"], 0)
        c["input"] = max(input_bytes, c["input"])
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix_str(
                f"{c['documents']:,} docs, {c['tokens']:,} tok, {self._rate():.2f} MB/s text"
            )
            return
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.last_line = now
            eta = self._eta()
            self._print(f"{self._done()}; {self._rate():.2f} MB/s" + (f"; {eta}" if eta else ""))

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled and summary is not None:
            elapsed = time.perf_counter() - self.t0
            self._print(
                f"done: {self._done()} in {_duration(elapsed)} ({self._rate():.2f} MB/s of text)"
            )
