"""Hugging Face interop: ``handgrad export hf`` and ``handgrad import hf``, for GPT-2 (here)
and the Llama-style model (``arch = "llama"``, translated by ``eval/hf_llama.py``; a
config.json with ``model_type = "llama"`` is imported as one).

The two layouts hold the same numbers under the same names (``transformer.h.0.attn.c_attn
.weight`` ...), with three differences that this module translates:

- HF's GPT-2 uses ``Conv1D`` layers, whose weight is (in, out) and computes y = x W + b; our
  ``Linear`` weight is (out, in) like ``torch.nn.Linear`` and computes y = x W^T + b. So the
  four projection weights per block (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.c_proj``) are transposed. ``c_attn`` stays packed as [q | k | v] either way.
- Our token embedding has ``padded_vocab_size`` rows; HF's has ``vocab_size``. Export drops
  the padding rows, import appends zero rows (they are never predicted: our logits cover the
  real vocabulary only).
- The output layer is tied to ``transformer.wte.weight`` in both; HF may also store
  ``lm_head.weight`` (equal to wte) and, in OpenAI's original release, the causal-mask
  buffers ``attn.bias`` / ``attn.masked_bias`` and names without the ``transformer.`` prefix.
  Import accepts all of these.

A model trained without biases (``bias = false``) is exported with zero biases, which
computes the same function in HF's always-biased GPT-2.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.checkpoint import read_config, read_json, resolve_checkpoint
from handgrad.diskspace import check_free_space, disk_full_guard
from handgrad.eval import hf_llama
from handgrad.eval.load import load_checkpoint_tokenizer
from handgrad.fileio import atomic_dir, write_json_atomic, write_text_atomic
from handgrad.manifest import verify_manifest, write_manifest
from handgrad.serialization import load_file, save_file

# Our Linear (out, in) <-> HF Conv1D (in, out): these weights are transposed on the way.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers of OpenAI's checkpoints (the causal mask and its fill value), not parameters
# (careful: "attn.c_attn.bias" is a parameter; these are attn.bias itself).
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_LAYER_NORM_EPS = 1e-5  # handgrad's LayerNorm default, the value of every GPT-2 release
_ENDOFTEXT = "<|endoftext|>"


def _is_conv1d(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(_CONV1D)


def _bias_names(config: dict[str, Any]) -> list[tuple[str, int]]:
    """Names and sizes of the biases HF's GPT-2 has (for models trained with bias = false)."""
    C = config["n_embd"]
    names = [("transformer.ln_f.bias", C)]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        names += [
            (p + "ln_1.bias", C),
            (p + "ln_2.bias", C),
            (p + "attn.c_attn.bias", 3 * C),
            (p + "attn.c_proj.bias", C),
            (p + "mlp.c_fc.bias", 4 * C),
            (p + "mlp.c_proj.bias", C),
        ]
    return names


# ----------------------------------------------------------------------------------------
# export


def hf_config(model: dict[str, Any], eot_token: int | None, dtype: str) -> dict[str, Any]:
    """A transformers ``GPT2Config`` dict for our "model" section (a GPT2Config.to_dict())."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model["vocab_size"],
        "n_positions": model["block_size"],
        "n_ctx": model["block_size"],
        "n_embd": model["n_embd"],
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "layer_norm_epsilon": _LAYER_NORM_EPS,
        "resid_pdrop": model.get("dropout", 0.0),
        "embd_pdrop": model.get("dropout", 0.0),
        "attn_pdrop": model.get("dropout", 0.0),
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "dtype": dtype,
    }


def export_hf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32"
) -> Path:
    """Write ``checkpoint`` as a Hugging Face GPT-2 directory at ``out``.

    Files: config.json, model.safetensors and, for a BPE tokenizer, vocab.json, merges.txt,
    tokenizer.json, tokenizer_config.json and special_tokens_map.json. ``dtype`` is
    "float32" (default) or "stored" (keep the checkpoint's dtype, e.g. bfloat16). The
    directory is assembled in a temporary sibling and renamed into place, so an existing
    ``out`` is never left half-written; ``out`` must not exist or be empty.
    """
    ckpt = resolve_checkpoint(checkpoint)
    verify_manifest(ckpt, missing_ok=True)
    model_cfg = read_config(ckpt)["model"]
    weights_path = ckpt / "model.safetensors"
    state = load_file(weights_path)
    tokenizer = load_checkpoint_tokenizer(ckpt)
    eot = getattr(tokenizer, "eot_token", None)
    if dtype not in ("float32", "stored"):
        raise ValueError(f"export hf: dtype must be 'float32' or 'stored', got {dtype!r}")

    llama = model_cfg.get("arch") == "llama"
    if llama:
        tensors = hf_llama.to_hf(state, model_cfg, str(weights_path))
    else:
        tensors = _gpt2_to_hf(state, model_cfg, str(weights_path))
    for name, array in tensors.items():
        array = array.astype(B.float32) if dtype == "float32" else array
        tensors[name] = np.ascontiguousarray(array)
    out_dtype = B.dtype_name(next(iter(tensors.values())).dtype)

    # the weights, and the tokenizer's files at a few times the size of its handgrad file
    needed = sum(a.nbytes for a in tensors.values()) + 4 * (ckpt / "tokenizer.json").stat().st_size
    what = f"the Hugging Face export {out}"
    note = f"nothing was written to {out}"
    check_free_space(Path(out).parent, needed, what, note)
    guard = disk_full_guard(what, Path(out).parent, needed, note)
    with guard, _publish_dir(out, "export hf") as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        make_config = hf_llama.hf_config if llama else hf_config
        write_json_atomic(tmp / "config.json", make_config(model_cfg, eot, out_dtype))
        if hasattr(tokenizer, "export_hf"):
            _export_tokenizer(tokenizer, tmp, model_cfg["block_size"])
        else:
            print(
                f"export hf: {type(tokenizer).__name__} has no Hugging Face GPT-2 equivalent; "
                "wrote the model without tokenizer files"
            )
        write_manifest(tmp)  # last, over every file above
    return Path(out)


def _gpt2_to_hf(state: dict[str, Any], model_cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Our GPT-2 state dict -> HF's: Conv1D weights transposed, no padding rows, zero biases
    for a model without them."""
    V = model_cfg["vocab_size"]
    tensors: dict[str, Any] = {}
    for name, array in state.items():
        if name == "transformer.wte.weight":
            array = array[:V]  # drop the padding rows
        elif _is_conv1d(name):
            array = array.T
        tensors[name] = array
    missing_biases = [(n, size) for n, size in _bias_names(model_cfg) if n not in tensors]
    if missing_biases and not model_cfg.get("bias", True):
        wdtype = tensors["transformer.wte.weight"].dtype
        for name, size in missing_biases:
            tensors[name] = np.zeros(size, dtype=wdtype)
    _check_hf_state(tensors, model_cfg, source)
    return tensors


def _publish_dir(out: str | os.PathLike, command: str) -> contextlib.AbstractContextManager[Path]:
    """An empty temporary directory beside ``out`` that becomes ``out`` (which must be absent
    or empty) when the block succeeds, and is deleted when it fails: no half directory is ever
    left under the real name (``fileio.atomic_dir``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{command}: {out} exists and is not an empty directory")
    return atomic_dir(out)


def _export_tokenizer(tokenizer: Any, directory: Path, block_size: int) -> None:
    """vocab.json + merges.txt + tokenizer.json (the tokenizer's own export) and the two small
    files that tell transformers which tokens are special and how long inputs may be."""
    tokenizer.export_hf(directory)
    specials: dict[str, Any] = {}
    if tokenizer.eot_token is not None:
        specials = {"bos_token": _ENDOFTEXT, "eos_token": _ENDOFTEXT, "unk_token": _ENDOFTEXT}
    write_json_atomic(directory / "special_tokens_map.json", specials)
    write_json_atomic(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": block_size,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            **specials,
        },
    )


def _check_hf_state(tensors: dict[str, np.ndarray], model: dict[str, Any], source: str) -> None:
    """Every tensor HF's GPT-2 expects, with its shape; one error listing all problems."""
    C, V, T, L = model["n_embd"], model["vocab_size"], model["block_size"], model["n_layer"]
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    expected["transformer.ln_f.weight"] = (C,)
    for i in range(L):
        p = f"transformer.h.{i}."
        expected[p + "ln_1.weight"] = (C,)
        expected[p + "ln_2.weight"] = (C,)
        expected[p + "attn.c_attn.weight"] = (C, 3 * C)
        expected[p + "attn.c_proj.weight"] = (C, C)
        expected[p + "mlp.c_fc.weight"] = (C, 4 * C)
        expected[p + "mlp.c_proj.weight"] = (4 * C, C)
    expected.update({name: (size,) for name, size in _bias_names(model)})
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n} has shape {tuple(tensors[n].shape)}, expected {shape} (HF layout)"
        for n, shape in expected.items()
        if n in tensors and tuple(tensors[n].shape) != shape
    ]
    if problems:
        raise ValueError(f"{source}: does not match the model config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------
# import


def _read_hf_weights(directory: Path) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards named by model.safetensors.index.json. PyTorch's
    pytorch_model.bin (pickled Python objects, which can run code when loaded) is refused."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        raise ValueError(
            f"{directory}: only pytorch_model.bin (pickled Python objects) is present; handgrad "
            "loads safetensors only. Convert it to model.safetensors first (e.g. load it with transformers "
            "and save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"{directory}: no model.safetensors (or sharded index) found")


def gpt2_config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Our "model" section for a transformers GPT-2 config.json; refuses variants our GPT-2
    does not compute (another activation, inner size, epsilon or attention scaling)."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ValueError(f"{source}: {key!r} missing or not an integer")
    checks = [
        (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function {hf.get('activation_function')!r} (needs gelu_new)"),
        (hf.get("n_inner") in (None, 4 * hf["n_embd"]), f"n_inner {hf.get('n_inner')!r}"),
        (abs(hf.get("layer_norm_epsilon", _LAYER_NORM_EPS) - _LAYER_NORM_EPS) < 1e-12,
         f"layer_norm_epsilon {hf.get('layer_norm_epsilon')!r} (needs 1e-5)"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights false"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        (not hf.get("add_cross_attention", False), "add_cross_attention"),
        (hf.get("tie_word_embeddings", True), "tie_word_embeddings false (untied lm_head)"),
    ]  # fmt: skip
    unsupported = [what for ok, what in checks if not ok]
    if unsupported:
        raise ValueError(f"{source}: unsupported GPT-2 variant: " + ", ".join(unsupported))
    from handgrad.models.gpt2 import GPT2Config

    return GPT2Config(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        dropout=0.0,
        bias=True,
        dtype="float32",
    ).to_dict()


def import_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a Hugging Face GPT-2 or Llama directory into a handgrad run directory at ``out``:
    ``out/checkpoints/step_0000000/{model.safetensors, config.json, tokenizer.json}`` and
    ``out/latest`` naming it, so every ``--checkpoint`` option accepts ``out``.

    Weights are converted to float32 (our Linear layout, padded embedding). The tokenizer is
    read from vocab.json + merges.txt, from OpenAI's encoder.json + vocab.bpe, or else from a
    byte-level BPE tokenizer.json (all that `transformers` >= 5 saves), keeping its ids (special
    tokens first, as Hugging Face's BpeTrainer puts them, or last, as GPT-2). A Llama
    directory (``model_type = "llama"``) becomes an ``arch = "llama"`` model the same way."""
    from handgrad.models.gpt2 import GPT2Config
    from handgrad.models.llama import LlamaConfig

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"import hf: {source} is not a directory")
    hf = read_json(source / "config.json")
    if isinstance(hf, dict) and hf.get("model_type") == "llama":
        model_cfg = hf_llama.config_from_hf(hf, str(source / "config.json"))
        config = LlamaConfig.from_dict(model_cfg)
        state = _read_hf_weights(source)
        tensors = hf_llama.from_hf(state, model_cfg, config.padded_vocab_size, str(source))
        return _write_import(source, out, config, tensors, "huggingface-llama")
    model_cfg = gpt2_config_from_hf(hf, str(source / "config.json"))
    config = GPT2Config.from_dict(model_cfg)
    state = _read_hf_weights(source)

    tensors: dict[str, np.ndarray] = {}
    head = None
    for name, array in state.items():
        full = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if full.endswith(_BUFFERS):
            continue
        if full == "lm_head.weight":
            head = array
            continue
        tensors[full] = array.astype(B.float32)
    _check_hf_state(tensors, model_cfg, str(source))
    wte = tensors["transformer.wte.weight"]
    if head is not None and not np.array_equal(head.astype(B.float32), wte):
        raise ValueError(
            f"{source}: lm_head.weight differs from transformer.wte.weight; handgrad's GPT-2 "
            "ties them and cannot hold a separate output layer"
        )
    for name in list(tensors):
        if _is_conv1d(name):
            tensors[name] = np.ascontiguousarray(tensors[name].T)
    padded = np.zeros((config.padded_vocab_size, config.n_embd), dtype=B.float32)
    padded[: config.vocab_size] = wte
    tensors["transformer.wte.weight"] = padded
    return _write_import(source, out, config, tensors, "huggingface-gpt2")


def _write_import(
    source: Path, out: str | os.PathLike, config: Any, tensors: dict[str, Any], fmt: str
) -> Path:
    """The run directory of ``import_hf``, with the tokenizer read from ``source``."""
    from handgrad.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.from_hf(source)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but config.json says "
            f"vocab_size = {config.vocab_size}"
        )

    step = Path("checkpoints") / "step_0000000"
    with _publish_dir(out, "import hf") as tmp:
        ckpt = tmp / step
        ckpt.mkdir(parents=True)
        save_file(tensors, ckpt / "model.safetensors")
        write_json_atomic(
            ckpt / "config.json",
            {
                "model": config.to_dict(),
                "imported_from": {"format": fmt, "path": str(source.resolve())},
            },
        )
        tokenizer.save(ckpt / "tokenizer.json")
        write_manifest(ckpt)
        write_text_atomic(tmp / "latest", f"{step.as_posix()}\n")
    return Path(out)


def describe(path: str | os.PathLike) -> str:
    """One line about an exported directory, for the CLI."""
    path = Path(path)
    files = sorted(p.name for p in path.iterdir())
    return f"{path}: {', '.join(files)}"


__all__ = ["export_hf", "gpt2_config_from_hf", "hf_config", "import_hf"]
