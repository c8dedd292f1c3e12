"""Benchmark handgrad's BPE tokenizer against Hugging Face `tokenizers` and `tiktoken`.

Run by hand:  .venv/bin/python benchmarks/bench_tokenizer.py [--vocab-size 8192] [--repeat 10]

Corpus: CPython's own documentation (pydoc_data topics + docstrings of the stdlib sources, read
with `ast`, nothing imported) plus tiny Shakespeare (../shared/data/tinyshakespeare.txt, if
present), then the same corpus repeated `--repeat` times.
  (1) training a `--vocab-size` vocabulary: ours vs tokenizers' BpeTrainer (same documents;
      note tokenizers uses every core, ours one)          target: ours within 3x of theirs
  (2) encoding on one process: ours (fresh word cache, then warm) vs tiktoken built on our
      vocabulary with to_tiktoken()                        target: >= 0.5x tiktoken's MB/s
"""

from __future__ import annotations

import argparse
import ast
import os
import sysconfig
import time
from pathlib import Path

from handgrad.tokenizer import BPETokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def python_docs() -> list[str]:
    """pydoc topics + every module/class/function docstring of the stdlib sources (~2 MB)."""
    from pydoc_data.topics import topics

    docs = list(topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


def corpus() -> list[str]:
    docs = python_docs()
    if SHAKESPEARE.is_file():
        docs += SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
    else:
        print(f"note: {SHAKESPEARE} not found, using the Python docs only")
    return docs


def train_hf(docs: list[str], vocab_size: int) -> float:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t0 = time.perf_counter()
    hf.train_from_iterator(docs, trainer)
    return time.perf_counter() - t0


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def encode_all(encode, docs: list[str]) -> list[list[int]]:
    return [encode(d) for d in docs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    base = corpus()
    rows = []
    for scale in (1, args.repeat):
        docs = base * scale
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        label = f"{mb:.1f} MB"

        tok, ours_train = timed(BPETokenizer.train, docs, args.vocab_size, show_progress=False)
        theirs_train = train_hf(docs, args.vocab_size)
        rows.append(
            (
                f"train {args.vocab_size} vocab, {label}",
                "s",
                ours_train,
                theirs_train,
                "tokenizers",
                theirs_train / ours_train,
            )
        )

        # Encoding: best of 3 (the machine may be shared); "cold" uses a fresh word cache.
        enc = tok.to_tiktoken()
        cold = warm = theirs_enc = float("inf")
        for _ in range(3):
            fresh = BPETokenizer.from_dict(tok.to_dict())
            ids_cold, t = timed(encode_all, fresh.encode_ordinary, docs)
            cold = min(cold, t)
            ids_warm, t = timed(encode_all, fresh.encode_ordinary, docs)
            warm = min(warm, t)
            ids_tt, t = timed(encode_all, enc.encode_ordinary, docs)
            theirs_enc = min(theirs_enc, t)
            assert ids_cold == ids_tt == ids_warm, "encodings differ from tiktoken"
        rows.append(
            (
                f"encode (cold cache), {label}",
                "MB/s",
                mb / cold,
                mb / theirs_enc,
                "tiktoken",
                theirs_enc / cold,
            )
        )
        rows.append(
            (
                f"encode (warm cache), {label}",
                "MB/s",
                mb / warm,
                mb / theirs_enc,
                "tiktoken",
                theirs_enc / warm,
            )
        )

    print(
        f"\ncores: {os.cpu_count()}  (tokenizers' trainer is multi-threaded; ours and the "
        "tiktoken encode run on one thread)"
    )
    print(
        f"{'task':<36} {'unit':>5} {'ours':>9} {'theirs':>9}  {'vs':<10} {'ours/theirs speed':>17}"
    )
    for task, unit, ours, theirs, who, ratio in rows:
        print(f"{task:<36} {unit:>5} {ours:9.2f} {theirs:9.2f}  {who:<10} {ratio:17.2f}x")


if __name__ == "__main__":
    main()
