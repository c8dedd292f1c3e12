"""Sub-commands of this area::

    handgrad eval --checkpoint DIR [--data DIR] [--batches N] [--split val] [--output FILE.json]
    handgrad eval zero-shot --checkpoint DIR (--tasks T1,T2 | --suite gpt2-paper) [--limit N]
                            [--batch-size B] [--output FILE.json] [--data-dir DIR]
    handgrad export hf --checkpoint DIR --out DIR
    handgrad import hf --from DIR --out DIR
    handgrad report --checkpoint DIR [--zero-shot FILE.json] --out MODEL_CARD.md

``eval`` takes an optional positional mode: none (validation metrics) or ``zero-shot``; the
options of both are accepted by one parser and checked per mode. Heavy imports (lm-eval,
the model) happen when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="validation metrics of a checkpoint, or the zero-shot suite via lm-eval",
        description="Without MODE: validation loss, perplexity and bits per token on prepared "
        "data (the trainer's evaluation). MODE zero-shot: lm-evaluation-harness tasks.",
    )
    ev.add_argument("mode", nargs="?", choices=["zero-shot"], help="zero-shot: run lm-eval")
    ev.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    ev.add_argument("--output", help="write the results as JSON to this file")
    ev.add_argument("--device", help="cpu (default), cuda or cuda:N: where the model runs")
    g = ev.add_argument_group("validation metrics (no MODE)")
    g.add_argument(
        "--data", help="prepared data directory (meta.json, val.bin, ...); default: the run's own"
    )
    g.add_argument("--split", default="val", choices=["val", "train"])
    g.add_argument("--batches", type=int, help="number of batches (default: the run's [eval])")
    g.add_argument("--micro-batch-size", type=int, help="windows per batch (default: the run's)")
    z = ev.add_argument_group("zero-shot")
    z.add_argument("--tasks", help="comma-separated lm-eval task names")
    z.add_argument("--suite", help="a named task list: gpt2-paper")
    z.add_argument("--limit", type=float, help="at most this many documents per task")
    z.add_argument("--batch-size", type=int, default=1)
    z.add_argument("--data-dir", help="read every task from <dir>/<task>/test.jsonl")
    z.add_argument("--bootstrap-iters", type=int, default=100_000, help="for stderr (0: none)")
    ev.set_defaults(func=_eval)

    export = subparsers.add_parser("export", help="export a checkpoint to another format")
    export_sub = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = export_sub.add_parser("hf", help="Hugging Face GPT-2 or Llama directory")
    hf.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    hf.add_argument("--out", required=True, help="new (or empty) output directory")
    hf.add_argument(
        "--dtype", default="float32", choices=["float32", "stored"],
        help="float32 (default) or the checkpoint's stored dtype",
    )  # fmt: skip
    hf.set_defaults(func=_export_hf)

    imp = subparsers.add_parser("import", help="import a model from another format")
    imp_sub = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    ihf = imp_sub.add_parser("hf", help="Hugging Face GPT-2 (OpenAI's too) or Llama directory")
    ihf.add_argument("--from", dest="source", required=True, help="HF model directory")
    ihf.add_argument("--out", required=True, help="new (or empty) run directory to write")
    ihf.set_defaults(func=_import_hf)

    rep = subparsers.add_parser("report", help="write the model card of a run")
    rep.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    rep.add_argument("--zero-shot", help="lm-eval results JSON (handgrad eval zero-shot --output)")
    rep.add_argument("--out", required=True, help="the card to write, e.g. MODEL_CARD.md")
    rep.add_argument("--title", help="card title (default: the run directory's name)")
    rep.set_defaults(func=_report)


def _fail(parser_hint: str) -> int:
    print(f"handgrad eval: error: {parser_hint}", file=sys.stderr)
    return 2


def _eval(args: argparse.Namespace) -> int:
    if args.mode == "zero-shot":
        return _zero_shot(args)
    stray = [o for o, v in (("--tasks", args.tasks), ("--suite", args.suite)) if v]
    if stray:
        return _fail(f"{', '.join(stray)} belong to 'handgrad eval zero-shot'")
    from handgrad.eval.validate import format_metrics, validation_metrics
    from handgrad.fileio import write_json_atomic

    metrics = validation_metrics(
        args.checkpoint, args.data, args.split, args.batches, args.micro_batch_size,
        device=args.device,
    )  # fmt: skip
    print(format_metrics(metrics))
    if args.output:
        write_json_atomic(args.output, metrics)
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    if args.data:
        return _fail("--data is for validation metrics; zero-shot reads --data-dir")
    from handgrad.eval.zero_shot import results_table, run_zero_shot, write_results

    limit = args.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)
    results = run_zero_shot(
        tasks=args.tasks,
        suite=args.suite,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        limit=limit,
        data_dir=args.data_dir,
        bootstrap_iters=args.bootstrap_iters,
        device=args.device,
    )
    print(results_table(results))
    if args.output:
        write_results(results, args.output)
        print(f"results written to {args.output}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from handgrad.eval.hf import describe, export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {describe(out)}")
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from handgrad.eval.hf import import_hf

    out = import_hf(args.source, args.out)
    print(f"imported {args.source} -> {out} (latest: {(out / 'latest').read_text().strip()})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from handgrad.eval.report import write_report

    out = write_report(args.checkpoint, args.out, zero_shot=args.zero_shot, title=args.title)
    print(f"model card written to {out}")
    return 0
