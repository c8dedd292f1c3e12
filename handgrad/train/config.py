"""Training configuration: TOML with sections [model] [data] [optim] [train] [eval].

A config is read, overridden with ``--set section.key=value`` and validated into dataclasses
before any work starts, so a typo or an impossible combination costs no tokenizer training
and no data preparation. Errors name the file, the key and what was expected.

The shipped configs live in ``handgrad/train/configs/`` (package data, so they work from an
installed package); ``configs/`` at the repository root is a link to that directory, so
``configs/<name>.toml`` names the same files. A config is named either by a path to a TOML
file or by the stem of a shipped one (``quickstart``, ``shakespeare-char``,
``gpt2-124m-owt``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from handgrad.backend.device import device as as_device_spec
from handgrad.models import ARCHS, DEFAULT_ARCH
from handgrad.models.gpt2 import GPT2Config

SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "quickstart"
SECTIONS = ("model", "data", "optim", "train", "eval")
LOGGERS = ("tensorboard", "wandb")  # [train] loggers: metrics.jsonl is always written


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, the key and the problem."""


# ----------------------------------------------------------------------------------------
# the sections


def _model_section() -> type:
    """``[model]``: ``arch`` ("gpt2", the default, or "llama"), a preset of that architecture
    and/or any fields of its config class (GPT2Config, LlamaConfig), which override it.

    The fields are the union of the config classes' own, each optional (None: from the
    preset, or the class's default), and the section is checked by building the class that
    ``arch`` names from it, so its rules live in one place. ``vocab_size`` comes from the
    prepared data when the section does not set it."""
    fields = {"arch": str | None, "preset": str | None}
    for config_class, _, _ in ARCHS.values():
        hints = get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            fields.setdefault(f.name, hints[f.name] | None)
    section = dataclasses.make_dataclass(
        "ModelSection", [(name, t, None) for name, t in fields.items()]
    )
    section.__doc__ = _model_section.__doc__
    section.__module__ = __name__
    return section


ModelSection = _model_section()


@dataclass
class DataSection:
    """``[data]``: what to train on.

    ``source`` is anything ``handgrad data prepare --source`` accepts (``pydocs``,
    ``shakespeare``, ``openwebtext``, a .txt/.jsonl/.parquet file, directory or glob), or a
    directory already prepared (it holds meta.json). Raw sources are prepared once into
    ``cache_dir`` (default ``$HANDGRAD_CACHE/prepared`` or ``~/.cache/handgrad/prepared``),
    keyed by source, tokenizer and val_fraction.
    """

    source: str = ""
    tokenizer: str | None = None  # "char", "train:N" or a tokenizer .json file
    val_fraction: float = 0.0005
    cache_dir: str | None = None
    workers: int | None = None  # tokenizer processes for preparation (default: all cores)


@dataclass
class OptimSection:
    """``[optim]``: AdamW and the warmup + cosine learning-rate schedule."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 0
    decay_steps: int | None = None  # default: train.max_steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eps: float = 1e-8


@dataclass
class TrainSection:
    """``[train]``: the loop. Global batch = micro_batch_size x grad_accum_steps x processes."""

    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # optional cross-check of the product above
    block_size: int | None = None  # training window; default and maximum: the model's
    seed: int = 1337
    # a trained model to start from (fine-tuning): a run, a checkpoint, an `import hf` output
    # or a Hugging Face GPT-2 directory; its weights, shape and tokenizer (train/finetune.py)
    init_from: str | None = None
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    processes: int = 1  # data-parallel processes on this machine (handgrad/parallel/)
    zero: int = 0  # 1: AdamW state sharded over MPI ranks (ZeRO-1, handgrad/parallel/zero.py)
    # MPI: seconds of no progress beyond a step's usual time, or of silence from a rank, before
    # the watchdog ends the job naming the rank and host that failed (0: no watchdog)
    collective_timeout: float = 10.0
    sample_tokens: int = 200  # length of the sample printed at each evaluation (0: none)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N": where the model and its batches live
    # "highest": float32 matmuls in full float32; "high": TF32 tensor cores allowed (CUDA only)
    matmul_precision: str = "highest"
    # matrix products in bfloat16, norms and the loss in float32 (hg.autocast): "bf16",
    # "none", or "auto" (bf16 on a GPU, none on the CPU, where it is a slower reference)
    autocast: str = "auto"

    def autocast_precision(self) -> str | None:
        """``autocast`` resolved for ``device``: "bf16" or None."""
        if self.autocast == "auto":
            return "bf16" if str(self.device).startswith("cuda") else None
        return "bf16" if self.autocast in ("bf16", "bfloat16") else None

    # where metrics go besides metrics.jsonl: "tensorboard", "wandb" (train/loggers.py)
    loggers: list[str] = field(default_factory=list)


@dataclass
class EvalSection:
    """``[eval]``: validation every ``interval`` steps (0: only at the end)."""

    interval: int = 250
    batches: int = 20
    sample_prompt: str = ""  # empty: start from end-of-text (or a newline)
    sample_temperature: float = 0.8
    sample_top_k: int | None = 200


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    name: str = "config"  # the file or preset it came from, for messages and run names

    def to_dict(self) -> dict[str, Any]:
        """The five sections as plain dicts (None values dropped: TOML has no null)."""
        return {
            s: {k: v for k, v in dataclasses.asdict(getattr(self, s)).items() if v is not None}
            for s in SECTIONS
        }

    def to_toml(self) -> str:
        """The five sections as a TOML document that ``load_config`` reads back."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items())
            lines.append("")
        return "\n".join(lines)

    @property
    def global_batch_size(self) -> int:
        t = self.train
        return t.micro_batch_size * t.grad_accum_steps * t.processes

    @property
    def decay_steps(self) -> int:
        """Steps of the cosine decay: ``[optim] decay_steps``, by default ``max_steps``."""
        o = self.optim
        return self.train.max_steps if o.decay_steps is None else o.decay_steps

    def model_for(self, data_vocab_size: int) -> GPT2Config:
        """The model of ``[model]`` for data of ``data_vocab_size`` token ids."""
        return resolve_model_config(self.model, data_vocab_size)

    def resolved(self, model: GPT2Config, block_size: int) -> dict[str, Any]:
        """The config as a run saves it: every section, the model's full GPT2Config and the
        training window, so a resume needs nothing else."""
        out = self.to_dict()
        out["model"] = model.to_dict()
        out["train"]["block_size"] = block_size
        return out

    def with_processes(self, processes: int) -> TrainConfig:
        """This config with ``[train] processes`` = ``processes`` (the world size of an MPI
        job), checked again: the global batch grows with it."""
        if processes == self.train.processes:
            return self
        cfg = dataclasses.replace(self, train=dataclasses.replace(self.train, processes=processes))
        try:
            validate(cfg, cfg.name)
        except ConfigError as err:
            raise ConfigError(
                f"{err} (under MPI, processes is the world size, {processes})"
            ) from None
        return cfg


_SECTION_TYPES = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "eval": EvalSection,
}


# ----------------------------------------------------------------------------------------
# reading


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A TOML path as given, or the shipped config of that name."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ConfigError(
            f"unknown config {str(name_or_path)!r}: not a .toml file and not a shipped config "
            f"({', '.join(shipped_configs())})"
        )
    return shipped


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value). The value is a TOML literal (``3``,
    ``1e-3``, ``true``, ``[0.9, 0.95]``, ``"text"``); a bare word that is not valid TOML is
    taken as a string, so ``--set data.tokenizer=char`` works without quotes."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    lhs, value = item.split("=", 1)
    if lhs.count(".") != 1:
        raise ConfigError(f"--set {item!r}: expected section.key=value (one dot, e.g. optim.lr)")
    section, key = (s.strip() for s in lhs.split("."))
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return section, key, parsed


def load_config(
    config: str | os.PathLike | dict | None = None,
    overrides: list[str] | None = None,
    origin: str = "config",
) -> TrainConfig:
    """Read a config (a path, a shipped name, a dict of sections, or None for the default),
    apply ``--set`` overrides and validate it. ``origin`` names a dict's source in messages.
    Raises ConfigError naming the problem."""
    if isinstance(config, dict):
        raw, name = _copy_sections(config), "config"
    else:
        path = resolve_config_path(DEFAULT_CONFIG if config is None else config)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        origin, name = str(path), path.stem
    for item in overrides or []:
        section, key, value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}"
            )
        raw.setdefault(section, {})[key] = value
    if overrides:  # a mistake may be in the file or in a --set: name both
        origin += " with " + " ".join(f"--set {item}" for item in overrides)
    cfg = from_dict(raw, origin)
    cfg.name = name
    return cfg


def resume_config(
    saved: dict[str, Any], overrides: list[str] | None, origin: str, name: str
) -> TrainConfig:
    """The config a run resumed without CONFIG continues with: the checkpoint's own
    ``saved`` config.json, with ``--set`` overrides on top; ``origin`` names the file."""
    cfg = load_config({k: v for k, v in saved.items() if k in SECTIONS}, overrides, origin)
    cfg.name = name
    return cfg


def _copy_sections(d: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(raw: dict[str, Any], origin: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from {section: {key: value}}."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{origin}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)}; "
            f"valid sections: {', '.join(f'[{s}]' for s in SECTIONS)}"
        )
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table of key = value")
        sections[name] = _build_section(cls, name, values, origin)
    cfg = TrainConfig(**sections)
    validate(cfg, origin)
    return cfg


def _build_section(cls: type, section: str, values: dict[str, Any], origin: str) -> Any:
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{origin}: unknown key {key!r} in [{section}]; valid keys: {', '.join(valid)}"
            )
        kwargs[key] = _check_type(value, hints[key], f"{origin}: [{section}] {key}")
    return cls(**kwargs)


def _type_name(t: Any) -> str:
    args = [a for a in get_args(t) if a is not type(None)]
    if get_origin(t) is list:
        return f"a list of {_type_name(args[0])}"
    if args:
        names = " or ".join(_type_name(a) for a in args)
        return names
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        t, str(t)
    )


def _check_type(value: Any, t: Any, where: str) -> Any:
    """``value`` converted to type ``t`` (int -> float allowed), or a ConfigError."""
    args = get_args(t)
    if type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where)
    if get_origin(t) is list:
        if args[0] is str and isinstance(value, str):
            # --set train.loggers=tensorboard,wandb: a bare word list, comma separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(t)}")
        return [_check_type(v, args[0], where) for v in value]
    ok = (
        (t is bool and isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (t is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(
            f"{where} = {value!r}: expected {_type_name(t)}, got {type(value).__name__}"
        )
    return float(value) if t is float else value


# ----------------------------------------------------------------------------------------
# validation of values (types were checked on the way in)


def _device_problems(t: TrainSection) -> list[str]:
    """What is wrong with ``[train] device``, ``matmul_precision`` and ``autocast`` (empty
    when nothing)."""
    out = []
    try:
        dev = as_device_spec(t.device)
    except (TypeError, ValueError):
        return [f"[train] device = {t.device!r}: expected 'cpu', 'cuda' or 'cuda:N'"]
    del dev  # whether the device fits the launch (forked ranks, MPI) is the run mode's
    if t.matmul_precision not in ("highest", "high"):
        out.append(
            f"[train] matmul_precision = {t.matmul_precision!r}: must be 'highest' or 'high'"
        )
    if t.autocast not in ("auto", "bf16", "bfloat16", "none"):
        out.append(f"[train] autocast = {t.autocast!r}: must be 'auto', 'bf16' or 'none'")
    return out


def validate(cfg: TrainConfig, origin: str = "config") -> None:
    """Impossible values are errors now, not an hour into a run."""
    problems: list[str] = []

    def need(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    m, d, o, t, e = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.eval
    need(bool(d.source), "[data] source is required (pydocs, shakespeare, a file or a directory)")
    need(
        d.tokenizer is None
        or d.tokenizer == "char"
        or d.tokenizer.endswith(".json")
        or _is_train_spec(d.tokenizer)
        or (t.init_from is not None and Path(d.tokenizer).expanduser().is_dir()),
        f"[data] tokenizer = {d.tokenizer!r}: expected 'char', 'train:N' (N an integer >= 257) "
        "or a tokenizer .json file",
    )
    need(0.0 <= d.val_fraction < 1.0, f"[data] val_fraction = {d.val_fraction}: must be in [0, 1)")
    need(d.workers is None or d.workers >= 1, f"[data] workers = {d.workers}: must be >= 1")

    need(_finite(o.lr) and o.lr > 0, f"[optim] lr = {o.lr}: must be > 0")
    need(
        _finite(o.min_lr) and 0 <= o.min_lr <= o.lr,
        f"[optim] min_lr = {o.min_lr}: must be in [0, lr = {o.lr}]",
    )
    need(o.warmup_steps >= 0, f"[optim] warmup_steps = {o.warmup_steps}: must be >= 0")
    decay = cfg.decay_steps
    need(decay >= 1, f"[optim] decay_steps = {decay}: must be >= 1")
    need(
        o.warmup_steps <= decay,
        f"[optim] warmup_steps = {o.warmup_steps} is greater than decay_steps = {decay} "
        "(the cosine decay would end before warmup does)",
    )
    need(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        f"[optim] betas = {o.betas}: expected two numbers in [0, 1)",
    )
    need(o.weight_decay >= 0, f"[optim] weight_decay = {o.weight_decay}: must be >= 0")
    need(o.grad_clip >= 0, f"[optim] grad_clip = {o.grad_clip}: must be >= 0 (0 disables)")
    need(o.eps > 0, f"[optim] eps = {o.eps}: must be > 0")

    need(t.max_steps >= 1, f"[train] max_steps = {t.max_steps}: must be >= 1")
    need(t.micro_batch_size >= 1, f"[train] micro_batch_size = {t.micro_batch_size}: must be >= 1")
    need(t.grad_accum_steps >= 1, f"[train] grad_accum_steps = {t.grad_accum_steps}: must be >= 1")
    need(t.processes >= 1, f"[train] processes = {t.processes}: must be >= 1")
    need(t.zero in (0, 1), f"[train] zero = {t.zero}: must be 0 or 1 (ZeRO stage 1)")
    need(
        t.collective_timeout >= 0,
        f"[train] collective_timeout = {t.collective_timeout}: must be >= 0 seconds (0: off)",
    )
    if t.global_batch_size is not None and t.micro_batch_size >= 1 and t.processes >= 1:
        per_step = t.micro_batch_size * t.processes
        if t.global_batch_size % per_step != 0:
            problems.append(
                f"[train] global_batch_size = {t.global_batch_size} is not divisible by "
                f"micro_batch_size x processes = {t.micro_batch_size} x {t.processes}"
            )
        elif t.global_batch_size != per_step * t.grad_accum_steps:
            problems.append(
                f"[train] global_batch_size = {t.global_batch_size} but micro_batch_size x "
                f"grad_accum_steps x processes = {t.micro_batch_size} x {t.grad_accum_steps} x "
                f"{t.processes} = {per_step * t.grad_accum_steps}; set grad_accum_steps = "
                f"{t.global_batch_size // per_step}"
            )
    need(
        t.block_size is None or t.block_size >= 1,
        f"[train] block_size = {t.block_size}: must be >= 1",
    )
    for key in ("log_interval", "checkpoint_interval", "sample_tokens"):
        need(getattr(t, key) >= 0, f"[train] {key} = {getattr(t, key)}: must be >= 0")
    need(t.log_interval >= 1, f"[train] log_interval = {t.log_interval}: must be >= 1")
    need(t.keep_checkpoints >= 1, f"[train] keep_checkpoints = {t.keep_checkpoints}: must be >= 1")
    problems.extend(_device_problems(t))
    for name in t.loggers:
        need(
            name in LOGGERS,
            f"[train] loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}",
        )
    for name in set(t.loggers) & set(LOGGERS):
        need(
            importlib.util.find_spec(name) is not None,
            f"[train] loggers = [{name!r}] needs the {name!r} package, which is not installed: "
            f"pip install 'handgrad[track]' (or pip install {name})",
        )
    need(
        len(set(t.loggers)) == len(t.loggers),
        f"[train] loggers = {t.loggers}: a logger is named twice",
    )

    need(e.interval >= 0, f"[eval] interval = {e.interval}: must be >= 0 (0: only at the end)")
    need(e.batches >= 0, f"[eval] batches = {e.batches}: must be >= 0 (0: no evaluation)")
    need(
        e.batches == 0 or d.val_fraction > 0 or _maybe_prepared(d.source),
        f"[eval] batches = {e.batches} needs a validation split, but [data] val_fraction = 0",
    )
    need(e.sample_temperature >= 0, f"[eval] sample_temperature = {e.sample_temperature}: >= 0")
    need(
        e.sample_top_k is None or e.sample_top_k >= 1,
        f"[eval] sample_top_k = {e.sample_top_k}: must be >= 1",
    )
    if not problems and t.init_from is None:  # else [model] is checked against the checkpoint
        # [model] is checked by building its GPT2Config (vocab_size is a placeholder when it
        # comes from the data), and the training window against the model's: all before any
        # data is prepared
        try:
            model_cfg = resolve_model_config(m, data_vocab_size=m.vocab_size or 1)
        except ConfigError as err:
            problems.append(str(err))
        else:
            if t.block_size is not None and t.block_size > model_cfg.block_size:
                problems.append(
                    f"[train] block_size = {t.block_size} is above the model's block_size = "
                    f"{model_cfg.block_size}"
                )
    if problems:
        raise ConfigError(f"{origin}: invalid config:\n  " + "\n  ".join(problems))


def resolve_model_config(m: Any, data_vocab_size: int) -> Any:
    """The config of ``[model]`` (a GPT2Config, or a LlamaConfig for ``arch = "llama"``): the
    preset (if any) with the given fields on top. ``vocab_size`` is the data's unless the
    section sets it (a preset's vocabulary describes its usual tokenizer, not the data at
    hand), and ``padded_vocab_size`` follows it (next multiple of 64) unless set. The config
    class's own checks are the section's rules."""
    arch = DEFAULT_ARCH if m.arch is None else m.arch
    if arch not in ARCHS:
        raise ConfigError(f"[model] arch = {arch!r}: unknown; choose one of {', '.join(ARCHS)}")
    config_class, _, module = ARCHS[arch]
    fields = {
        f.name: getattr(m, f.name)
        for f in dataclasses.fields(m)
        if f.name not in ("arch", "preset") and getattr(m, f.name) is not None
    }
    foreign = [k for k in fields if k not in {f.name for f in dataclasses.fields(config_class)}]
    if foreign:
        raise ConfigError(f"[model] {', '.join(foreign)}: not a setting of arch = {arch!r}")
    fields.setdefault("vocab_size", data_vocab_size)
    fields.setdefault("padded_vocab_size", None)
    presets = module.PRESETS
    try:
        if m.preset is not None:
            if m.preset not in presets:
                raise ConfigError(
                    f"[model] preset = {m.preset!r}: unknown for arch = {arch!r}; choose one of "
                    f"{', '.join(presets)}"
                )
            return config_class.from_preset(m.preset, **fields)
        missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in fields]
        if missing:
            raise ConfigError(
                f"[model] needs a preset or {', '.join(missing)} (presets: {', '.join(presets)})"
            )
        return config_class(**fields)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"[model]: {str(err).removeprefix(f'{config_class.__name__}: ')}"
        ) from None


def _toml_value(v: Any) -> str:
    """A TOML literal for a config value (a string, number, boolean or list of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    return repr(v)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _is_train_spec(spec: str) -> bool:
    head, _, n = spec.partition(":")
    return head == "train" and n.isdigit() and int(n) >= 257


def _maybe_prepared(source: str) -> bool:
    return (Path(source) / "meta.json").is_file()
