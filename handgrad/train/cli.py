"""`handgrad train` and `handgrad sample`: the command-line face of handgrad.train."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from handgrad.train.config import DEFAULT_CONFIG, ConfigError, load_config, shipped_configs


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GPT-2 from a TOML config",
        description="Train a GPT-2. CONFIG is a .toml file or a shipped config name "
        f"({', '.join(shipped_configs())}); default {DEFAULT_CONFIG}.",
    )
    p.add_argument("preset", nargs="?", metavar="CONFIG", help="a .toml file or shipped name")
    p.add_argument("--config", help="a .toml file or shipped config name (same as CONFIG)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, parsed as a TOML literal (repeatable), "
        "e.g. --set train.max_steps=100 --set optim.betas=[0.9,0.99]",
    )
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="DIR",
        help="continue from the latest checkpoint of DIR (a run or checkpoint directory; "
        "default: the --out directory). Without CONFIG the checkpoint's own config is used.",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--print-config", action="store_true", help="print the config as it will run, and exit"
    )
    p.set_defaults(func=_train)

    s = subparsers.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Print text sampled from a checkpoint (a run directory or a checkpoint "
        "directory); the tokenizer is the checkpoint's tokenizer.json.",
    )
    s.add_argument("--checkpoint", required=True, metavar="DIR")
    s.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--stop-at-eos", action="store_true", help="stop a sample at end-of-text")
    s.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    s.set_defaults(func=_sample)


def _error(command: str, message: object) -> int:
    from handgrad.parallel.modes import rank_prefix

    print(f"handgrad {command}: error: {rank_prefix()}{message}", file=sys.stderr)
    return 1


def _train(args: argparse.Namespace) -> int:
    from handgrad.checkpoint import CheckpointError, run_dir_of
    from handgrad.parallel import RankStopped
    from handgrad.train.checkpointing import load_checkpoint
    from handgrad.train.config import resume_config
    from handgrad.train.trainer import TrainingDiverged, train

    if args.preset and args.config and args.preset != args.config:
        return _error("train", f"two configs given: {args.preset!r} and --config {args.config!r}")
    config_name = args.config or args.preset
    try:
        resume = None
        if args.resume is not None:
            default_out = Path("runs") / (Path(config_name).stem if config_name else DEFAULT_CONFIG)
            resume_dir = Path(args.resume or args.out or default_out)
            ckpt = load_checkpoint(resume_dir)
            resume = ckpt.path
            out = Path(args.out) if args.out else run_dir_of(ckpt.path)
            if config_name is None:  # continue with the checkpoint's own config
                origin = str(ckpt.path / "config.json")
                cfg = resume_config(ckpt.config, args.overrides, origin, out.name)
            else:
                cfg = load_config(config_name, args.overrides)
        else:
            cfg = load_config(config_name, args.overrides)
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            if (out / "latest").exists() or (out / "metrics.jsonl").exists():
                # a new run here would overwrite the old run's metrics and mix checkpoints
                return _error(
                    "train",
                    f"{out} already holds a run; continue it with --resume {out}, or choose "
                    "another --out (or delete that directory)",
                )
        if args.print_config:
            print(cfg.to_toml(), end="")
            return 0
        result = train(cfg, out, resume=resume, progress=False if args.no_progress else None)
    except RankStopped:
        return 1  # under MPI: another rank failed and printed why
    except (ConfigError, CheckpointError) as e:
        return _error("train", e)
    except TrainingDiverged as e:
        return _error("train", e)
    except KeyboardInterrupt:
        print("\ninterrupted; the latest complete checkpoint is unchanged", file=sys.stderr)
        return 130
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        return _error("train", e)
    if not result.writes:  # under MPI, rank 0 reports
        return 0
    if result.step == result.first_step:
        print(
            f"nothing to train: {out} is already at step {result.step} (train.max_steps = "
            f"{cfg.train.max_steps}); train it further with --resume {out} --set "
            f"train.max_steps=N, N > {result.step}"
        )
        return 0
    summary = (
        f"done: {result.step} steps, {result.tokens_seen:,} tokens in {result.elapsed_s:.1f} s"
    )
    if result.final_eval is not None:
        ev = result.final_eval
        summary += (
            f"; val loss {ev.loss:.4f} nats (ppl {ev.perplexity:.2f}, "
            f"{ev.bits_per_token:.3f} bits/token)"
        )
    if result.unigram_loss is not None:
        summary += (
            f"; unigram baseline {result.unigram_loss:.4f} nats "
            f"(ppl {math.exp(result.unigram_loss):.1f})"
        )
    print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        print(f"sample with: handgrad sample --checkpoint {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from handgrad.backend.device import device
    from handgrad.checkpoint import CheckpointError, resolve_checkpoint
    from handgrad.models import model_from_checkpoint
    from handgrad.tokenizer import load_tokenizer
    from handgrad.train.sampling import prompt_ids

    if args.num_samples < 1:
        return _error("sample", f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt)
        if args.device is not None:
            model.to(device(args.device))  # device(): one clear error for a bad name
        tok_path = ckpt / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path}: missing (the checkpoint has no tokenizer)")
        tokenizer = load_tokenizer(tok_path)
        if args.stop_at_eos and tokenizer.eot_token is None:
            raise ValueError(
                f"--stop-at-eos: the tokenizer of {ckpt} has no end-of-text token (a character "
                "tokenizer, say), so no sample can end at one; leave the option out"
            )
        ids = prompt_ids(tokenizer, args.prompt)
        block = model.config.block_size
        if len(ids) > block:
            print(
                f"warning: the prompt is {len(ids)} tokens, more than the model's block_size "
                f"of {block}: the model sees only its last {block} tokens",
                file=sys.stderr,
            )
        seed = args.seed if args.seed is not None else time.time_ns() % 2**32
        start = time.perf_counter()
        out = model.generate(
            np.asarray([ids] * args.num_samples, dtype=np.int64),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=seed,
            stop_at_eos=args.stop_at_eos,
            eos_token_id=tokenizer.eot_token,
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        return _error("sample", e)
    seconds = time.perf_counter() - start
    eot = tokenizer.eot_token
    for i, row in enumerate(out):
        new = [int(t) for t in row[len(ids) :]]
        if args.stop_at_eos and eot in new:
            new = new[: new.index(eot)]
        if i:
            print("-" * 40)
        print(args.prompt + tokenizer.decode(new))
    n = sum(len(r) - len(ids) for r in out)
    print(f"[{n} tokens in {seconds:.2f} s, seed {seed}]", file=sys.stderr)
    return 0
