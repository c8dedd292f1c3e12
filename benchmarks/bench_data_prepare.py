"""Benchmark `data prepare`: tokens/s with 1 worker vs N workers (target: N workers ~ N x 1 worker).

Corpus: the pydocs documents plus tiny Shakespeare replicated `--shakespeare-copies` times, cut into
documents of about 10 kB at blank lines, all in one .jsonl file. The BPE tokenizer (`--vocab`
tokens) is learnt once on the pydocs corpus, outside the timings.

    .venv/bin/python benchmarks/bench_data_prepare.py [--workers 2] [--shakespeare-copies 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

from handgrad.data import build_pydocs_corpus, prepare
from handgrad.data.prepare import default_workers
from handgrad.tokenizer import BPETokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def shakespeare_documents(copies: int, doc_chars: int = 10_000) -> list[str]:
    if not SHAKESPEARE.is_file():
        print(f"({SHAKESPEARE} not found: pydocs only)")
        return []
    docs, current = [], ""
    for paragraph in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n"):
        current += paragraph + "\n\n"
        if len(current) >= doc_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs * copies


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--shakespeare-copies", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    pydocs = [d["text"] for d in build_pydocs_corpus()]
    documents = pydocs + shakespeare_documents(args.shakespeare_copies)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        t0 = time.perf_counter()
        tok = BPETokenizer.train(pydocs, args.vocab, show_progress=False)
        tok.save(tmp / "tok.json")
        train_s = time.perf_counter() - t0
        print(
            f"corpus: {len(documents):,} documents, {n_bytes / 1e6:.1f} MB; "
            f"BPE {args.vocab} learnt on pydocs in {train_s:.1f} s"
        )

        # Interleave the worker counts and keep each one's best run, so that a burst of load from
        # elsewhere on the machine hurts one sample rather than one configuration.
        counts = sorted({1, args.workers})
        best = dict.fromkeys(counts, float("inf"))
        cpu = dict.fromkeys(counts, 0.0)
        outputs, n_tokens = {}, 0
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            for workers in counts:
                out = tmp / f"out{workers}_{r}"
                t0, cpu0 = time.perf_counter(), cpu_seconds()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    meta = prepare(corpus, tmp / "tok.json", out, workers=workers, progress=False)
                seconds = time.perf_counter() - t0
                if seconds < best[workers]:
                    best[workers], cpu[workers] = seconds, cpu_seconds() - cpu0
                outputs[workers] = (out / "train.bin").read_bytes() + (out / "val.bin").read_bytes()
                n_tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
        rows = [(w, best[w], cpu[w], n_bytes / best[w] / 1e6, n_tokens / best[w]) for w in counts]
        print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")

    identical = len(set(outputs.values())) == 1
    base = rows[0][4]
    print(
        f"\n{'workers':>7} {'seconds':>8} {'cpu s':>6} {'MB/s':>7} {'tokens/s':>11} "
        f"{'speedup':>8} {'ideal':>6}"
    )
    for workers, seconds, cpu_s, mbps, tps in rows:
        print(
            f"{workers:>7} {seconds:>8.2f} {cpu_s:>6.2f} {mbps:>7.2f} {tps:>11,.0f} "
            f"{tps / base:>7.2f}x {workers:>5}x"
        )
    print(f"\noutputs byte-identical across worker counts: {identical}")


if __name__ == "__main__":
    main()
