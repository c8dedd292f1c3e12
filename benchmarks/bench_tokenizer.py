"""Benchmark handgrad's BPE tokenizer against Hugging Face `tokenizers` and `tiktoken`.

Run by hand:  .venv/bin/python benchmarks/bench_tokenizer.py [--vocab-size 8192] [--repeat 10]
                  [--encode-mb 10] [--seed 0]

Corpus: CPython's own documentation (pydoc_data topics + docstrings of the stdlib sources, read
with `ast`, nothing imported) plus tiny Shakespeare (../shared/data/tinyshakespeare.txt, if
present), about 3.4 MB, then the same corpus repeated `--repeat` times.
  (1) training a `--vocab-size` vocabulary on both sizes: ours vs tokenizers' BpeTrainer (same
      documents; tokenizers uses every core, ours one)     target: ours <= 1.5x their time
  (2) encoding on one process, with the vocabulary learnt from the 3.4 MB corpus, of
      `--encode-mb` MB of unseen text from textgen.py (a word-level Markov chain over the corpus
      with 3% random words): ours with a fresh (cold) word cache, then the same text again
      (warm), vs tiktoken built on our vocabulary with to_tiktoken(), in the same run, best of
      3 alternating                                        target: >= 0.5x tiktoken's MB/s
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


def encode_rows(tok: BPETokenizer, docs: list[str]) -> list[tuple]:
    """Cold and warm encoding speed of `docs`, ours vs tiktoken, best of 3 alternating."""
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    label = f"{mb:.1f} MB unseen"
    enc = tok.to_tiktoken()
    state = tok.to_dict()
    cold = warm = theirs = float("inf")
    for _ in range(3):
        fresh = BPETokenizer.from_dict(state)  # an empty word cache
        ids_cold, t = timed(encode_all, fresh.encode_ordinary, docs)
        cold = min(cold, t)
        ids_warm, t = timed(encode_all, fresh.encode_ordinary, docs)
        warm = min(warm, t)
        ids_tt, t = timed(encode_all, enc.encode_ordinary, docs)
        theirs = min(theirs, t)
        assert ids_cold == ids_tt == ids_warm, "encodings differ from tiktoken"
        del ids_cold, ids_warm, ids_tt
    return [
        (
            f"encode (cold cache), {label}",
            "MB/s",
            mb / cold,
            mb / theirs,
            "tiktoken",
            theirs / cold,
        ),
        (
            f"encode (warm cache), {label}",
            "MB/s",
            mb / warm,
            mb / theirs,
            "tiktoken",
            theirs / warm,
        ),
    ]


def main() -> None:
    from textgen import generate_documents  # imports this module: not at the top

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--encode-mb", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the unseen text")
    args = parser.parse_args()

    base = corpus()
    rows = []
    tok = None
    for scale in (1, args.repeat):
        docs = base * scale
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        ours = theirs = float("inf")
        for _ in range(2 if scale == 1 else 1):  # best of 2 where it is quick
            trained, t = timed(BPETokenizer.train, docs, args.vocab_size, show_progress=False)
            ours = min(ours, t)
            theirs = min(theirs, train_hf(docs, args.vocab_size))
        tok = tok or trained
        rows.append(
            (
                f"train {args.vocab_size} vocab, {mb:.1f} MB",
                "s",
                ours,
                theirs,
                "tokenizers",
                theirs / ours,
            )
        )
    assert tok is not None
    unseen = list(generate_documents(int(args.encode_mb * 1e6), seed=args.seed, texts=base))
    rows += encode_rows(tok, unseen)

    print(
        f"\ncores: {os.cpu_count()}  (tokenizers' trainer is multi-threaded; ours and the "
        "tiktoken encode run on one thread)"
    )
    print(
        f"{'task':<38} {'unit':>5} {'ours':>9} {'theirs':>9}  {'vs':<10} {'ours/theirs speed':>17}"
    )
    for task, unit, ours, theirs, who, ratio in rows:
        print(f"{task:<38} {unit:>5} {ours:9.2f} {theirs:9.2f}  {who:<10} {ratio:17.2f}x")


if __name__ == "__main__":
    main()
