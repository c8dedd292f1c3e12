"""The ``handgrad`` command: one sub-command per stage of the pipeline.

    handgrad tokenizer train|encode|decode   learn and use a byte-level BPE
    handgrad data prepare                    raw text -> token shards
    handgrad train                           train a GPT-2 from a TOML config
    handgrad sample                          generate text from a checkpoint
    handgrad eval [zero-shot]                validation metrics / lm-eval zero-shot suite
    handgrad export hf | import hf           Hugging Face GPT-2 and Llama interop
    handgrad report                          write the model card
    handgrad verify PATH                     check a run, checkpoint or data for damaged files

Each area registers its own sub-commands (``handgrad/<area>/cli.py: register``) and
imports its heavy dependencies only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

_AREAS = (
    "handgrad.tokenizer.cli",
    "handgrad.data.cli",
    "handgrad.train.cli",
    "handgrad.eval.cli",
    "handgrad.verify.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handgrad",
        description="Train and evaluate GPT-2 with a deep learning library written by hand.",
    )
    parser.add_argument("--version", action="version", version=f"handgrad {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _AREAS:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from handgrad import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from handgrad.diskspace import DiskFullError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (
        ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError, DiskFullError
    ) as e:  # fmt: skip
        # Expected failures (bad config, bad input, missing files) get one clear line, not
        # a traceback; HANDGRAD_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("HANDGRAD_DEBUG"):
            raise
        print(f"handgrad {args.command}: error: {e}", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line of the command's output ("warning: ..."), not a source echo."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
