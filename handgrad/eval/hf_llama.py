"""Hugging Face Llama interop: the config and weight translations behind ``handgrad export hf``
and ``handgrad import hf`` for ``arch = "llama"`` models (``eval/hf.py`` does the files).

The two layouts hold the same numbers under HF's names (``model.layers.0.self_attn.o_proj
.weight`` ...), all Linear weights (out, in) in both, with three differences:

- our q, k and v projections are one packed ``qkv_proj`` (rows [q | k | v]) and gate and up
  one ``gate_up_proj`` (rows [gate | up]): import stacks HF's, export splits them;
- our token embedding has ``padded_vocab_size`` rows, HF's ``vocab_size``: export drops the
  padding rows, import appends zero rows;
- with tied embeddings HF stores no ``lm_head.weight`` (import ignores one equal to the
  embedding).

Both sides rotate queries and keys in the rotate-half convention with the same angles, so
no permutation of the q and k rows is needed (as it is for Meta's original checkpoints).
Variants our model does not compute (another activation, biases, a head size other than
hidden / heads, scaled RoPE) are refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handgrad import backend as B

_SKIPPED = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved, not a weight


def config_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Our "model" section (a LlamaConfig.to_dict()) for a transformers Llama config.json."""
    from handgrad.models.llama import LlamaConfig

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "vocab_size")  # fmt: skip
    for key in keys:
        if not isinstance(hf.get(key), int):
            raise ValueError(f"{source}: {key!r} missing or not an integer")
    C, n_head = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = [
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (not hf.get("attention_bias", False), "attention_bias true"),
        (not hf.get("mlp_bias", False), "mlp_bias true"),
        (hf.get("head_dim") in (None, C // n_head), f"head_dim {hf.get('head_dim')!r} "
         f"(needs hidden_size / num_attention_heads = {C // n_head})"),
        (rope_type == "default" and not hf.get("rope_scaling"), f"rope_type {rope_type!r}"),
    ]  # fmt: skip
    unsupported = [what for ok, what in checks if not ok]
    if unsupported:
        raise ValueError(f"{source}: unsupported Llama variant: " + ", ".join(unsupported))
    return LlamaConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=C,
        intermediate_size=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    ).to_dict()


def hf_config(model: dict[str, Any], eot_token: int | None, dtype: str) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict for our "model" section (a LlamaConfig.to_dict())."""
    theta = model["rope_theta"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model["vocab_size"],
        "hidden_size": model["n_embd"],
        "intermediate_size": model["intermediate_size"],
        "num_hidden_layers": model["n_layer"],
        "num_attention_heads": model["n_head"],
        "num_key_value_heads": model["n_kv_head"],
        "head_dim": model["n_embd"] // model["n_head"],
        "hidden_act": "silu",
        "max_position_embeddings": model["block_size"],
        "rms_norm_eps": model["norm_eps"],
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,  # where transformers 4 reads it
        "attention_bias": False,
        "attention_dropout": model.get("dropout", 0.0),
        "mlp_bias": False,
        "tie_word_embeddings": model["tie_embeddings"],
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "dtype": dtype,
    }


def _hf_shapes(model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor HF's LlamaForCausalLM has for ``model``, with its shape."""
    C, V, I = model["n_embd"], model["vocab_size"], model["intermediate_size"]  # noqa: E741
    h = C // model["n_head"]
    q, kv = model["n_head"] * h, model["n_kv_head"] * h
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not model["tie_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    for i in range(model["n_layer"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (q, C), p + "self_attn.k_proj.weight": (kv, C),
            p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, q),
            p + "mlp.gate_proj.weight": (I, C), p + "mlp.up_proj.weight": (I, C),
            p + "mlp.down_proj.weight": (C, I),
        })  # fmt: skip
    return shapes


def _check(tensors: dict[str, np.ndarray], model: dict[str, Any], source: str) -> None:
    """One error listing every missing, unexpected or mis-shaped tensor (HF layout)."""
    expected = _hf_shapes(model)
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n} has shape {tuple(tensors[n].shape)}, expected {shape} (HF layout)"
        for n, shape in expected.items()
        if n in tensors and tuple(tensors[n].shape) != shape
    ]
    if problems:
        raise ValueError(f"{source}: does not match the model config: " + "; ".join(problems))


# packed name -> the HF names whose rows it stacks, in order
_PACKED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
           "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}  # fmt: skip


def from_hf(
    state: dict[str, np.ndarray], model: dict[str, Any], padded_vocab_size: int, source: str
) -> dict[str, np.ndarray]:
    """HF Llama weights -> our state dict (float32, packed projections, padded embedding)."""
    tensors = {n: a for n, a in state.items() if not n.endswith(_SKIPPED)}
    head = tensors.pop("lm_head.weight", None) if model["tie_embeddings"] else None
    _check(tensors, model, source)
    embed = tensors["model.embed_tokens.weight"]
    if head is not None and not np.array_equal(head, embed):
        raise ValueError(
            f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
            "model.embed_tokens.weight"
        )
    out = {n: a.astype(B.float32) for n, a in tensors.items()}
    for i in range(model["n_layer"]):
        p = f"model.layers.{i}."
        for packed, parts in _PACKED.items():
            out[p + packed] = np.concatenate([out.pop(p + part) for part in parts])
    padded = np.zeros((padded_vocab_size, model["n_embd"]), dtype=B.float32)
    padded[: model["vocab_size"]] = embed
    out["model.embed_tokens.weight"] = padded
    return out


def to_hf(state: dict[str, np.ndarray], model: dict[str, Any], source: str) -> dict[str, Any]:
    """Our state dict -> HF Llama weights (split projections, no padding rows)."""
    h = model["n_embd"] // model["n_head"]
    sizes = {"self_attn.qkv_proj.weight": [model["n_head"] * h, model["n_kv_head"] * h],
             "mlp.gate_up_proj.weight": [model["intermediate_size"]]}  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for name, array in state.items():
        packed = next((k for k in _PACKED if name.endswith(k)), None)
        if name == "model.embed_tokens.weight":
            out[name] = array[: model["vocab_size"]]
        elif packed is not None:
            prefix = name[: -len(packed)]
            pieces = np.split(array, np.cumsum(sizes[packed]))
            out.update({prefix + part: a for part, a in zip(_PACKED[packed], pieces)})
        else:
            out[name] = array
    _check(out, model, source)
    return out
