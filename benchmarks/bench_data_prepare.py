"""Benchmark `data prepare` on unseen text: MB/s and peak memory at 1 and N workers, and the time
projected for OpenWebText's 38 GB.

Corpus: `--size` of generated text (benchmarks/textgen.py: a seeded word-level Markov chain over
the Python docs and tiny Shakespeare plus random words, never a copy), one {"text": ...} line per
document. The BPE tokenizer (`--vocab` tokens) is learnt beforehand on 1 MB of the real corpus,
outside the timings. Each preparation runs in a fresh process that reports its own peak RSS and
its workers' (the largest one; ru_maxrss, which counts the main process's image at the
spawn too), so memory can be compared between sizes: it should not grow with
the corpus.

    python benchmarks/bench_data_prepare.py --size 100MB [--workers 2] [--vocab 4096]

The projection for 16 workers assumes the per-worker efficiency measured at N workers holds,
which needs 16 free cores (a 2-core machine cannot measure it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tokenizer import corpus  # noqa: E402
from textgen import parse_size, write_jsonl  # noqa: E402

from handgrad.data.prepare import default_workers  # noqa: E402
from handgrad.tokenizer import BPETokenizer  # noqa: E402

OPENWEBTEXT_BYTES = 38e9


def child(corpus_path: str, tokenizer: str, out: str, workers: int) -> None:
    """One timed preparation in this (fresh) process; prints a JSON line."""
    from handgrad.data import prepare

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    meta = prepare(corpus_path, tokenizer, out, workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "tokens": tokens,
                "rss_main_mb": peak_rss_mb(),
                "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would include the parent's image from
    before exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def learn_tokenizer(path: Path, vocab: int) -> float:
    docs, n = [], 0
    for d in corpus():
        docs.append(d)
        n += len(d)
        if n >= 1_000_000:
            break
    t0 = time.perf_counter()
    BPETokenizer.train(docs, vocab, show_progress=False).save(path)
    return time.perf_counter() - t0


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("10MB"))
    parser.add_argument("--workers", type=int, default=max(default_workers(), 2))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:3], int(args.child[3]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "corpus.jsonl"
        t0 = time.perf_counter()
        n_docs = write_jsonl(source, args.size, args.seed)
        n_bytes = source.stat().st_size
        print(
            f"corpus: {n_docs:,} generated documents, {n_bytes / 1e6:.1f} MB of jsonl "
            f"(seed {args.seed}, {time.perf_counter() - t0:.0f} s to generate)"
        )
        train_s = learn_tokenizer(tmp / "tok.json", args.vocab)
        print(f"tokenizer: BPE {args.vocab} learnt on 1 MB of the real corpus in {train_s:.1f} s")
        rows, outputs = {}, {}
        for workers in sorted({1, args.workers}):
            out = tmp / f"out{workers}"
            cmd = [sys.executable, __file__, "--child", str(source), str(tmp / "tok.json")]
            proc = subprocess.run(
                [*cmd, str(out), str(workers)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                sys.exit(f"prepare with {workers} worker(s) failed:\n{proc.stderr}")
            rows[workers] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[workers] = (out / "train.bin").read_bytes() + (out / "val.bin").read_bytes()
            print(f"  {workers} worker(s) done in {rows[workers]['seconds']:.1f} s", flush=True)

    print(f"\nload average (1 min): {os.getloadavg()[0]:.2f}, cores: {os.cpu_count()}")
    print(
        f"{'workers':>7} {'seconds':>8} {'MB/s':>7} {'tokens/s':>11} {'speedup':>8} "
        f"{'RSS main MB':>12} {'RSS worker MB':>14}"
    )
    base = n_bytes / rows[1]["seconds"]
    for workers, r in rows.items():
        rate = n_bytes / r["seconds"]
        worker_rss = f"{r['rss_worker_mb']:.0f}" if workers > 1 else "-"
        print(
            f"{workers:>7} {r['seconds']:>8.2f} {rate / 1e6:>7.2f} {r['tokens'] / r['seconds']:>11,.0f} "
            f"{rate / base:>7.2f}x {r['rss_main_mb']:>12.0f} {worker_rss:>14}"
        )
    print(f"outputs byte-identical across worker counts: {len(set(outputs.values())) == 1}")
    n = max(rows)
    efficiency = min((n_bytes / rows[n]["seconds"]) / base / n, 1.0) if n > 1 else 1.0
    print(f"\nprojected for OpenWebText ({OPENWEBTEXT_BYTES / 1e9:.0f} GB of text):")
    for p in (1, 2, 16):
        rate = base * (1 if p == 1 else p * efficiency)
        note = "measured" if p in rows else f"assumes the {efficiency:.0%} per-worker efficiency"
        print(f"  {p:>2} worker(s): {hours(OPENWEBTEXT_BYTES / rate):>7}  ({note})")


if __name__ == "__main__":
    main()
