"""A Llama-style GPT ("the modern GPT block"): the configuration and the model.

Against GPT-2 (``models/gpt2.py``), each block (Touvron et al. 2023, "LLaMA") has
- RMSNorm instead of LayerNorm (``F.rms_norm``), before each sub-layer and at the end;
- rotary position embeddings on queries and keys (``F.rotary_embedding``, the rotate-half
  convention of Hugging Face's ``LlamaForCausalLM``), no position embedding table;
- grouped-query attention: ``n_kv_head`` key/value heads, each shared by n_head / n_kv_head
  query heads (Ainslie et al. 2023), broadcast inside ``F.scaled_dot_product_attention``;
- a SwiGLU MLP, down(silu(gate(x)) * up(x)) (``F.swiglu``);
- no biases, and an output layer of its own (``lm_head``) unless ``tie_embeddings``.

Parameter names are Hugging Face's (``model.layers.0.self_attn.o_proj.weight`` ...), except
that q, k and v are one packed projection ``qkv_proj`` (rows [q | k | v]) and gate and up one
``gate_up_proj`` (rows [gate | up]), so that each is one matmul; ``handgrad import/export hf``
splits and joins them. Sampling with the key/value cache and loading are GPT-2's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from handgrad import backend as B
from handgrad import nn
from handgrad.backend.device import device
from handgrad.models.gpt2 import _DTYPES, GPT2, KVCache, _is_int, _round_up, config_from_fields
from handgrad.nn import functional as F
from handgrad.nn import init
from handgrad.tensor import Tensor


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-style model.

    ``n_kv_head`` defaults to ``n_head`` (multi-head attention) and must divide it;
    ``intermediate_size`` (the SwiGLU width) defaults to 8/3 n_embd rounded up to a multiple
    of 64; ``padded_vocab_size`` to ``vocab_size`` rounded up to a multiple of 64. ``dtype``
    as GPT2Config's. ``to_dict`` carries ``arch = "llama"``, which selects this class.
    """

    arch: ClassVar[str] = "llama"

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    n_kv_head: int | None = None
    intermediate_size: int | None = None
    padded_vocab_size: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.padded_vocab_size is None and _is_int(self.vocab_size):
            self.padded_vocab_size = _round_up(self.vocab_size, 64)
        if self.intermediate_size is None and _is_int(self.n_embd):
            self.intermediate_size = _round_up(8 * self.n_embd // 3, 64)
        ints = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_kv_head",
                "intermediate_size", "padded_vocab_size")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive integer, got {value!r}")
        problems = [
            (self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.n_embd // self.n_head % 2 == 0,
             f"the head size n_embd / n_head ({self.n_embd / self.n_head:g}) must be even (RoPE)"),
            (self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"),
            (self.padded_vocab_size >= self.vocab_size,
             f"padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
             f"({self.vocab_size})"),
            (_number(self.rope_theta) and self.rope_theta > 0,
             f"rope_theta must be a positive number, got {self.rope_theta!r}"),
            (_number(self.norm_eps) and self.norm_eps >= 0,
             f"norm_eps must be a number >= 0, got {self.norm_eps!r}"),
            (isinstance(self.tie_embeddings, bool),
             f"tie_embeddings must be true or false, got {self.tie_embeddings!r}"),
            (_number(self.dropout) and 0.0 <= self.dropout < 1.0,
             f"dropout must be a number in [0, 1), got {self.dropout!r}"),
            (self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}"),
        ]  # fmt: skip
        for ok, message in problems:
            if not ok:
                raise ValueError(f"LlamaConfig: {message}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with ``"arch": "llama"``; ``from_dict`` inverts it."""
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a dict such as a checkpoint's config.json "model" section."""
        if not isinstance(d, dict):
            raise TypeError(f"LlamaConfig.from_dict: expected a dict, got {type(d).__name__}")
        if d.get("arch", cls.arch) != cls.arch:
            raise ValueError(f"LlamaConfig.from_dict: arch is {d['arch']!r}, not {cls.arch!r}")
        return config_from_fields(cls, {k: v for k, v in d.items() if k != "arch"})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named configuration (see ``PRESETS``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 124M's width, depth and vocabulary in the Llama block: 12 query heads sharing 4
    # key/value heads, SwiGLU 2,432 wide and a tied head give ~124M parameters.
    "llama-124m": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2432,
                       block_size=1024, vocab_size=50257, tie_embeddings=True, dtype="bfloat16"),
}  # fmt: skip


def num_parameters(config: LlamaConfig, non_embedding: bool = False) -> int:
    """The number of parameters of ``Llama(config)``, computed without building it.

    Per block (C = n_embd, h = head_dim, I = intermediate_size): two RMSNorms 2C, packed QKV
    C (n_head + 2 n_kv_head) h, output n_head h C, SwiGLU 3 C I. Then the embedding
    (padded_vocab_size C), the final norm C and an untied head vocab_size C.
    ``non_embedding`` leaves out the embedding when it is only a lookup (untied)."""
    C, h, I = config.n_embd, config.head_dim, config.intermediate_size  # noqa: E741
    block = 2 * C + C * (config.n_head + 2 * config.n_kv_head) * h + config.n_head * h * C
    block += 3 * C * I
    embedding = config.padded_vocab_size * C
    head = 0 if config.tie_embeddings else config.vocab_size * C
    n = config.n_layer * block + C + head
    return n if non_embedding and not config.tie_embeddings else n + embedding


def flops_per_token(config: LlamaConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, as GPT-2's ``flops_per_token``: 6 N (N without a lookup-only
    embedding) plus 12 n_layer n_embd T for attention's scores and mixing."""
    T = config.block_size if seq_len is None else seq_len
    return 6 * num_parameters(config, non_embedding=True) + 12 * config.n_layer * config.n_embd * T


# ----------------------------------------------------------------------------------------
# the model


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, h, dtype = config.n_embd, config.head_dim, config.dtype
        self.n_head, self.n_kv_head, self.dropout = config.n_head, config.n_kv_head, config.dropout
        qkv = (config.n_head + 2 * config.n_kv_head) * h
        self.qkv_proj = nn.Linear(C, qkv, bias=False, dtype=dtype)  # packed [q | k | v]
        self.o_proj = nn.Linear(config.n_head * h, C, bias=False, dtype=dtype)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Any, sin: Any, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C); cos, sin (T, head_dim / 2) are the RoPE tables of the
        T positions. With a cache, as GPT-2's: x follows the cached positions."""
        Bsz, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        hs, groups = C // nh, nh // nkv
        q, k, v = self.qkv_proj(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = F.rotary_embedding(q.reshape(Bsz, T, nh, hs).transpose(1, 2), cos, sin)
        k = F.rotary_embedding(k.reshape(Bsz, T, nkv, hs).transpose(1, 2), cos, sin)
        v = v.reshape(Bsz, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        # grouped-query attention: query head j reads key/value head j // groups, as the
        # (B, nkv, groups, T, hs) queries against (B, nkv, 1, S, hs) keys and values
        q = q.reshape(Bsz, nkv, groups, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q,
                k.reshape(Bsz, nkv, 1, T, hs),
                v.reshape(Bsz, nkv, 1, T, hs),
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=True,
            )
        else:  # inference only, as in GPT-2's attention; the cache holds rotated keys
            start, end = cache.length, cache.length + T
            cache.k[layer][:, :, start:end] = k.data
            cache.v[layer][:, :, start:end] = v.data
            keys = Tensor._make(cache.k[layer][:, :, None, :end])
            values = Tensor._make(cache.v[layer][:, :, None, :end])
            xp = B.get_array_module(k.data)
            allowed = xp.arange(end)[None, :] <= xp.arange(start, end)[:, None]  # (T, end)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=Tensor._make(allowed))
        y = y.reshape(Bsz, nh, T, hs).transpose(1, 2).reshape(Bsz, T, nh * hs)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, I, dtype = config.n_embd, config.intermediate_size, config.dtype  # noqa: E741
        self.gate_up_proj = nn.Linear(C, 2 * I, bias=False, dtype=dtype)  # packed [gate | up]
        self.down_proj = nn.Linear(I, C, bias=False, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C): down(silu(gate x) * up x)."""
        return self.dropout(self.down_proj(F.swiglu(self.gate_up_proj(x))))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        C, eps, dtype = config.n_embd, config.norm_eps, config.dtype
        self.input_layernorm = nn.RMSNorm(C, eps=eps, dtype=dtype)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(C, eps=eps, dtype=dtype)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Any, sin: Any, cache: KVCache | None = None, layer: int = 0
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-style language model with GPT2's interface: ``model(idx, targets)``,
    ``generate``, ``from_checkpoint``, ``num_parameters``, ``device`` and ``to``."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: expected a LlamaConfig, got {type(config).__name__}")
        self.config = config
        C, dtype = config.n_embd, config.dtype
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.padded_vocab_size, C, dtype=dtype),
                drop=nn.Dropout(config.dropout),
                layers=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                norm=nn.RMSNorm(C, eps=config.norm_eps, dtype=dtype),
            )
        )
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(C, config.vocab_size, bias=False, dtype=dtype)
        # the RoPE tables of every position, float32 (not saved: they follow from the config)
        cos, sin = F.rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", Tensor(cos), persistent=False)
        self.register_buffer("rope_sin", Tensor(sin), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation (N(0, 0.02), the residual output projections o_proj and
        down_proj at N(0, 0.02 / sqrt(2 n_layer))); the RMSNorm weights start at 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.Embedding):
                init.normal_(module.weight, 0.0, 0.02)

    @property
    def device(self) -> device:
        """Where the parameters live (``model.to(device)`` moves them)."""
        return self.model.embed_tokens.weight.device

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters counted on the built model (tied weights once); see ``num_parameters``."""
        n = sum(p.numel() for p in self.parameters())
        lookup_only = non_embedding and not self.config.tie_embeddings
        return n - self.model.embed_tokens.weight.numel() if lookup_only else n

    # ---- forward
    def _hidden(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx (B, T) token ids -> final hidden states (B, T, C) after the norm (float32)."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        cos, sin = self.rope_cos.data[start : start + T], self.rope_sin.data[start : start + T]
        x = self.model.drop(self.model.embed_tokens(idx).float())
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i)
        return self.model.norm(x)

    def _logits(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> logits (B, T, vocab_size): the head, or the embedding's real rows."""
        if self.config.tie_embeddings:
            return F.linear(x, self.model.embed_tokens.weight[: self.config.vocab_size])
        return self.lm_head(x)

    def _new_cache(self, batch_size: int) -> KVCache:
        """One (B, n_kv_head, block_size, head_dim) buffer per layer for keys, one for values."""
        return KVCache(self.config, batch_size, self.device, n_head=self.config.n_kv_head)

    # Checking ids, the loss, sampling with the key/value cache (keys are rotated at their
    # absolute positions, so past block_size the window is re-run, as GPT-2's position
    # embeddings need) and loading are GPT-2's code, written against config, _hidden, _logits
    # and _new_cache.
    forward = GPT2.forward
    _check_idx = GPT2._check_idx
    generate = GPT2.generate
    _step = GPT2._step
    from_state_dict = vars(GPT2)["from_state_dict"]
    from_checkpoint = vars(GPT2)["from_checkpoint"]
