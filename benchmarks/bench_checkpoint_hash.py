"""What manifests cost on a GPT-2 124M checkpoint: writing its two safetensors files, hashing
them into manifest.json, and verifying them when loading.

The arrays have the shapes of GPT-2 small (float32 weights, padded 50,304-row embedding) and of
its AdamW state (exp_avg and exp_avg_sq per parameter), filled with random numbers; the files
are written with handgrad's safetensors writer and hashed with sha256 and blake2b.

    .venv/bin/python benchmarks/bench_checkpoint_hash.py [--dir /tmp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from handgrad.manifest import hash_file, verify_manifest, write_manifest
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.serialization import save_file


def shapes_124m() -> dict[str, tuple[int, ...]]:
    model = GPT2(GPT2Config.from_preset("gpt2-124m"))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shapes = shapes_124m()
    weights = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    optimizer = {}
    for i, s in enumerate(shapes.values()):
        optimizer[f"state.{i}.exp_avg"] = rng.standard_normal(s, dtype=np.float32)
        optimizer[f"state.{i}.exp_avg_sq"] = rng.random(s, dtype=np.float32)
    n_params = sum(a.size for a in weights.values())
    print(f"GPT-2 124M: {n_params:,} parameters (padded embedding), {len(shapes)} tensors")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)

        def write() -> None:
            save_file(weights, d / "model.safetensors")
            save_file(optimizer, d / "optimizer.safetensors")

        t_write = best_of(args.repeat, write)
        files = ["model.safetensors", "optimizer.safetensors"]
        total = sum((d / f).stat().st_size for f in files)
        print(f"files: {total / 1e9:.3f} GB ({', '.join(files)})")
        print(f"write (safetensors, fsync):   {t_write:6.2f} s  {total / t_write / 1e9:.2f} GB/s")
        for algorithm in ("sha256", "blake2b"):
            t = best_of(args.repeat, lambda a=algorithm: [hash_file(d / f, a) for f in files])
            print(f"hash {algorithm:<8} (file, warm):  {t:6.2f} s  {total / t / 1e9:.2f} GB/s")
        data = os.urandom(256 << 20)
        for algorithm in ("sha256", "blake2b"):
            t = best_of(args.repeat, lambda a=algorithm: hashlib.new(a, data).digest())
            print(f"hash {algorithm:<8} (memory):      {t:6.2f} s  {len(data) / t / 1e9:.2f} GB/s")
        t_manifest = best_of(args.repeat, lambda: write_manifest(d, files))
        t_verify = best_of(args.repeat, lambda: verify_manifest(d))
        t_sizes = best_of(args.repeat, lambda: verify_manifest(d, hashes=False))
        print(
            f"write_manifest (sha256):      {t_manifest:6.2f} s  (+{t_manifest / t_write:.0%} of the write)"
        )
        print(f"verify_manifest:              {t_verify:6.2f} s")
        print(f"verify_manifest, sizes only:  {t_sizes * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
