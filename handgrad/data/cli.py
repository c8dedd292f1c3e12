"""`handgrad data prepare`: the command-line face of handgrad.data.prepare."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from handgrad.data.prepare import default_workers, prepare
from handgrad.data.resume import PROGRESS_FILE

SMALL_VAL = 4096  # tokens: a val split below this is said to be too small


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare token shards from text")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser(
        "prepare",
        help="tokenize a corpus into train.bin/val.bin + meta.json",
        description="Tokenize a corpus into OUT/{train,val}.bin, OUT/tokenizer.json and "
        "OUT/meta.json (written last).",
    )
    p.add_argument(
        "--source",
        required=True,
        help="pydocs | shakespeare | openwebtext | a .txt/.jsonl/.parquet file, directory or glob",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="FILE.json (a saved tokenizer) | char | train:N (learn an N-token BPE on train)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of documents (of characters, for a single document) kept for val "
        "(default: 0.0005; 0.1 of the conversations with --format chat)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"tokenizer processes (default: all cores, here {default_workers()})",
    )
    p.add_argument(
        "--text-field",
        default="text",
        help="the .jsonl field / .parquet column holding the text (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val document split")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count in meta.json) .jsonl lines that are not JSON or lack the text field",
    )
    p.add_argument(
        "--format",
        choices=["text", "chat"],
        default="text",
        help='chat: .jsonl conversations ({"messages": [...]}) for supervised fine-tuning, '
        "with chat tokens added to --tokenizer and a loss mask on assistant turns",
    )
    p.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # One line per problem ("warning: file.txt: ..."), without Python's source-line echo.
        warnings.showwarning = lambda message, *_, **__: print(
            f"warning: {message}", file=sys.stderr
        )
        return _run_prepare(args)


def _run_prepare(args: argparse.Namespace) -> int:
    if args.format == "chat":
        return _prepare_chat(args)
    try:
        meta = prepare(
            args.source,
            args.tokenizer,
            args.out,
            val_fraction=0.0005 if args.val_fraction is None else args.val_fraction,
            workers=args.workers,
            text_field=args.text_field,
            seed=args.seed,
            skip_bad_lines=args.skip_bad_lines,
        )
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        print(f"handgrad data prepare: error: {e}", file=sys.stderr)
        if (Path(args.out) / PROGRESS_FILE).is_file() and "space" not in str(e):
            print(
                f"the work done so far is kept in {args.out}: run the same command to resume",
                file=sys.stderr,
            )
        return 1
    splits = meta["splits"]
    print(
        f"wrote {args.out}: train {splits['train']['tokens']:,} tokens "
        f"({splits['train']['documents']:,} docs), val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']:,} docs), vocab {meta['vocab_size']:,}, {meta['dtype']}"
    )
    skipped = {k: v for k, v in meta.items() if k.endswith(("_skipped", "replacement", "_chars"))}
    if any(skipped.values()):
        print("skipped/replaced: " + json.dumps(skipped))
    val = splits["val"]["tokens"]
    if 0 < meta.get("val_fraction", 0) and val < SMALL_VAL:
        print(
            f"warning: the val split holds only {val:,} tokens (--val-fraction "
            f"{meta['val_fraction']}): too few to validate on, and fewer than a window of "
            f"block_size + 1 tokens of most models; a larger --val-fraction keeps more",
            file=sys.stderr,
        )
    return 0


def _prepare_chat(args: argparse.Namespace) -> int:
    import glob

    from handgrad.data.chat import prepare_chat
    from handgrad.tokenizer import load_tokenizer

    val = 0.1 if args.val_fraction is None else args.val_fraction
    try:
        files = sorted(glob.glob(args.source)) or [args.source]
        tokenizer = load_tokenizer(args.tokenizer)
        meta = prepare_chat(files, tokenizer, args.out, val_fraction=val)
    except (OSError, ValueError) as e:
        print(f"handgrad data prepare: error: {e}", file=sys.stderr)
        return 1
    splits = meta["splits"]
    print(
        f"wrote {args.out}: {splits['train']['documents']:,} conversations to train "
        f"({splits['train']['trained_tokens']:,} of {splits['train']['tokens']:,} tokens "
        f"trained on), {splits['val']['documents']:,} to validate; vocab {meta['vocab_size']:,}"
    )
    return 0
