"""GPT-2, in one file: the configuration, the model and sampling with a key/value cache.

The architecture is the one of Radford et al. (2019), "Language Models are Unsupervised
Multitask Learners", as nanoGPT writes it: token + position embeddings, ``n_layer``
pre-LayerNorm blocks (x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))), a final LayerNorm, and
a language-model head that reuses the token embedding matrix (weight tying, Press & Wolf 2017).

Parameter names are those of nanoGPT and Hugging Face's ``GPT2LMHeadModel``
(``transformer.h.0.attn.c_attn.weight`` ...). Our Linear weights are (out, in) like
``torch.nn.Linear``; HF stores GPT-2's as Conv1D (in, out), so interop is a transpose.

The token embedding has ``padded_vocab_size`` rows (50,304 = 64 * 786 for GPT-2's 50,257
tokens) because round matrix sizes make faster matmuls. The padding rows are never predicted:
logits cover only the ``vocab_size`` real tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from handgrad import backend as B
from handgrad import nn
from handgrad.backend.device import device, new_array, to_device
from handgrad.checkpoint import read_config, resolve_checkpoint
from handgrad.grad_mode import no_grad
from handgrad.manifest import verify_manifest
from handgrad.nn import functional as F
from handgrad.nn import init
from handgrad.nn.recompute import checkpoint
from handgrad.random import default_generator
from handgrad.serialization import load_file
from handgrad.tensor import Tensor

# ----------------------------------------------------------------------------------------
# configuration

_DTYPES = ("float32", "bfloat16")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class GPT2Config:
    """Hyper-parameters of a GPT-2 model.

    ``padded_vocab_size`` defaults to ``vocab_size`` rounded up to a multiple of 64.
    ``dtype`` is the storage dtype of the parameters; with "bfloat16" the forward pass still
    computes in float32 (bf16 parameters are cast on use; an optimizer keeps fp32 masters).
    ``recompute`` trades compute for memory in training: each block keeps only its input and
    runs again in backward (``nn/recompute.py``); the gradients are the same, bit for bit.
    """

    arch: ClassVar[str] = "gpt2"  # a "model" section without "arch" is GPT-2's (models/)

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    padded_vocab_size: int | None = None
    dropout: float = 0.0
    bias: bool = True
    dtype: str = "float32"
    recompute: bool = False  # keep each block's input only; recompute the block in backward

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None and _is_int(self.vocab_size):
            self.padded_vocab_size = _round_up(self.vocab_size, 64)
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "vocab_size",
            "padded_vocab_size",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"GPT2Config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPT2Config: padded_vocab_size ({self.padded_vocab_size}) must be >= "
                f"vocab_size ({self.vocab_size})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"GPT2Config: dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPT2Config: bias must be true or false, got {self.bias!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"GPT2Config: recompute must be true or false, got {self.recompute!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"GPT2Config: dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict(to_dict())`` gives the same config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Build from a dict such as a checkpoint's config.json "model" section."""
        return config_from_fields(cls, d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named configuration (see ``PRESETS``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def config_from_fields(cls: type, d: Any) -> Any:
    """``cls(**d)`` for a config dataclass, refusing a non-dict, unknown keys and missing
    required ones by name (every model config's ``from_dict``)."""
    name = f"{cls.__name__}.from_dict"
    if not isinstance(d, dict):
        raise TypeError(f"{name}: expected a dict, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys are {list(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise ValueError(f"{name}: missing required key(s) {missing}")
    return cls(**d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


_GPT2_VOCAB = 50257  # the GPT-2 BPE tokenizer: 50,000 merges + 256 bytes + <|endoftext|>

PRESETS: dict[str, dict[str, Any]] = {
    # The four OpenAI sizes. Parameters stored in bfloat16 (fp32 master weights live in the
    # optimizer); padded_vocab_size follows from vocab_size: 50,304.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      vocab_size=_GPT2_VOCAB, dtype="bfloat16"),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024,
                        vocab_size=_GPT2_VOCAB, dtype="bfloat16"),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024,
                       vocab_size=_GPT2_VOCAB, dtype="bfloat16"),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024,
                    vocab_size=_GPT2_VOCAB, dtype="bfloat16"),
    # nanoGPT's CPU recipe for tiny Shakespeare at character level. The vocabulary comes from
    # the data (65 distinct characters in tinyshakespeare.txt); pass vocab_size= for others.
    "shakespeare-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    # A small model for the quickstart and smoke tests, with the GPT-2 tokenizer's vocabulary.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=_GPT2_VOCAB),
}  # fmt: skip


def num_parameters(config: GPT2Config, non_embedding: bool = False) -> int:
    """The number of parameters of ``GPT2(config)``, computed without building it.

    Per block (C = n_embd, b = 1 with biases else 0): two LayerNorms 2 (C + bC), packed QKV
    3C^2 + 3bC, attention output C^2 + bC, MLP 4C^2 + 4bC and 4C^2 + bC. The LM head is tied
    to wte, so it adds nothing. ``non_embedding`` leaves out the position embeddings (as
    nanoGPT does: the token embedding is also the output layer, so it stays counted).
    """
    C, b = config.n_embd, int(config.bias)
    layer_norm = C + b * C
    block = 2 * layer_norm + (3 * C * C + 3 * b * C) + (C * C + b * C)
    block += (4 * C * C + 4 * b * C) + (4 * C * C + b * C)
    n = config.padded_vocab_size * C + config.n_layer * block + layer_norm
    return n if non_embedding else n + config.block_size * C


def flops_per_token(config: GPT2Config, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
    6 N for the weight matmuls plus 12 n_layer n_embd T for attention's scores and mixing
    (N without position embeddings, T = ``seq_len``, default block_size)."""
    T = config.block_size if seq_len is None else seq_len
    return 6 * num_parameters(config, non_embedding=True) + 12 * config.n_layer * config.n_embd * T


# ----------------------------------------------------------------------------------------
# the model


class KVCache:
    """Keys and values of the positions seen so far, one (B, n_head, block_size, head_dim)
    float32 buffer per layer for each on ``device`` (the model's), filled left to right;
    ``length`` positions are valid."""

    def __init__(
        self, config: Any, batch_size: int, device: Any = None, n_head: int | None = None
    ) -> None:
        heads = config.n_head if n_head is None else n_head  # Llama's: its key/value heads
        shape = (batch_size, heads, config.block_size, config.head_dim)
        self.k = [new_array(device, "zeros", shape, dtype=B.float32) for _ in range(config.n_layer)]
        self.v = [new_array(device, "zeros", shape, dtype=B.float32) for _ in range(config.n_layer)]
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        C, dtype = config.n_embd, config.dtype
        self.n_head, self.n_embd, self.dropout = config.n_head, C, config.dropout
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias, dtype=dtype)  # packed q, k, v
        self.c_proj = nn.Linear(C, C, bias=config.bias, dtype=dtype)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x holds the T positions that follow the
        ``cache.length`` cached ones; their keys and values are appended to the cache."""
        Bsz, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.reshape(Bsz, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.reshape(Bsz, T, nh, hs).transpose(1, 2)
        v = v.reshape(Bsz, T, nh, hs).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            # Inference only (generate runs under no_grad). The new queries sit at positions
            # start..start+T-1 and may attend to every key up to their own position.
            start, end = cache.length, cache.length + T
            cache.k[layer][:, :, start:end] = k.data
            cache.v[layer][:, :, start:end] = v.data
            keys = Tensor._make(cache.k[layer][:, :, :end])
            values = Tensor._make(cache.v[layer][:, :, :end])
            xp = B.get_array_module(k.data)
            allowed = xp.arange(end)[None, :] <= xp.arange(start, end)[:, None]  # (T, end)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=Tensor._make(allowed))
        y = y.transpose(1, 2).reshape(Bsz, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        C, dtype = config.n_embd, config.dtype
        self.c_fc = nn.Linear(C, 4 * C, bias=config.bias, dtype=dtype)
        self.c_proj = nn.Linear(4 * C, C, bias=config.bias, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C): expand 4x, GELU (tanh form; c_fc's bias added inside
        it, ``F.bias_gelu``: one pass, not two), project back."""
        h, b = F.linear(x, self.c_fc.weight), self.c_fc.bias
        h = F.gelu(h, approximate="tanh") if b is None else F.bias_gelu(h, b)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        C, dtype = config.n_embd, config.dtype
        self.ln_1 = nn.LayerNorm(C, bias=config.bias, dtype=dtype)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(C, bias=config.bias, dtype=dtype)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        # Pre-LayerNorm: each sub-layer reads a normalised copy and adds to the residual
        # stream; the attention's sum and the second norm are one op (one pass on a GPU).
        a, ln = self.attn(self.ln_1(x), cache, layer), self.ln_2
        x, h = F.residual_layer_norm(x, a, ln.weight, ln.bias, ln.eps)
        return x + self.mlp(h)


class GPT2(nn.Module):
    """GPT-2 language model. ``model(idx)`` gives next-token logits over the real vocabulary."""

    config_class = GPT2Config  # what from_checkpoint builds from config.json

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"GPT2: expected a GPT2Config, got {type(config).__name__}")
        self.config = config
        C, dtype = config.n_embd, config.dtype
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, C, dtype=dtype),
                wpe=nn.Embedding(config.block_size, C, dtype=dtype),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(C, bias=config.bias, dtype=dtype),
            )
        )
        # No lm_head parameter: the output layer is transformer.wte.weight (tied).
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, LayerNorms at (1, 0), and
        the residual output projections at N(0, 0.02 / sqrt(2 n_layer)), because each block
        adds two of them to the residual stream and the variance of a sum of 2 n_layer
        independent terms grows with their number."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init.normal_(module.weight, 0.0, 0.02)

    @property
    def device(self) -> device:
        """Where the parameters live (``model.to(device)`` moves them)."""
        return self.transformer.wte.weight.device

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters counted on the built model (tied weights once); see ``num_parameters``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---- forward
    def _hidden(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx (B, T) token ids -> final hidden states (B, T, C) after ln_f (float32)."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        # Positions start..start+T-1 are a contiguous range: their embeddings are a row slice
        # of wpe, whose gradient is a plain copy rather than the scatter-add of a lookup.
        pos_emb = self.transformer.wpe.weight[start : start + T]  # (T, C)
        # One cast: with bf16 parameters everything downstream promotes to float32.
        x = self.transformer.drop(tok_emb.float() + pos_emb)
        recompute = self.config.recompute and self.training and cache is None
        for i, block in enumerate(self.transformer.h):
            # recompute: only the block's input is kept for backward (nn/recompute.py)
            x = checkpoint(block, x) if recompute else block(x, cache, i)
        return self.transformer.ln_f(x)

    def _logits(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> logits (B, T, vocab_size) with the tied embedding as output layer.

        Rows 0..V-1 of the C-contiguous (V_padded, C) matrix are themselves a contiguous
        block, so ``linear`` on that row slice is one GEMM that never computes the padding
        logits. The alternative, the padded matmul followed by a slice, keeps a (B, T, V_padded)
        output plus a (B*T, V) copy of its non-contiguous slice for the loss, and its backward
        scatters into another (B, T, V_padded) array; the row slice is faster and smaller
        (benchmarks/README.md, "The output layer").
        """
        wte = self.transformer.wte.weight
        return F.linear(x, wte[: self.config.vocab_size])

    def forward(self, idx: Tensor | Any, targets: Tensor | Any | None = None) -> Any:
        """idx (B, T) int token ids in [0, vocab_size) -> logits (B, T, vocab_size).

        With ``targets`` (B, T) (the next token at each position; -1 marks positions to
        ignore) returns ``(logits, loss)``, the loss the mean cross entropy over the counted
        positions. ``idx`` and ``targets`` given as arrays or lists are put on the model's
        device; tensors must be there already."""
        idx = self._check_idx(idx, "idx")
        logits = self._logits(self._hidden(idx))
        if targets is None:
            return logits
        targets = targets if isinstance(targets, Tensor) else Tensor(targets, device=idx.device)
        if tuple(targets.shape) != tuple(idx.shape):
            raise ValueError(
                f"{type(self).__name__}.forward: targets have shape {tuple(targets.shape)}, "
                "expected the shape "
                f"of idx {tuple(idx.shape)}"
            )
        V = self.config.vocab_size
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _check_idx(
        self, idx: Tensor | Any, what: str, limit: int | None = None, place: bool = True
    ) -> Tensor:
        """``idx`` as a (B, T) integer tensor, on the model's device when it was given as an
        array (unless not ``place``). Token ids are range-checked where they are on the host: on a GPU that check
        would wait for the device once per call, so device ids are trusted (the trainer's
        batches come from shards checked against the vocabulary)."""
        given = idx
        if not isinstance(idx, Tensor):
            idx = Tensor(idx if B.is_array(idx) else np.asarray(idx))
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(
                f"{type(self).__name__}: {what} must be a (batch, time) array of integer token "
                f"ids, got shape {tuple(idx.shape)} and dtype {idx.dtype}"
            )
        T, limit = idx.shape[1], self.config.block_size if limit is None else limit
        if T > limit:
            raise ValueError(
                f"{type(self).__name__}: cannot forward a sequence of length {T}, block_size is "
                f"only {self.config.block_size}"
            )
        if idx.device.type == "cpu":
            _check_ids(idx.data, what, self.config.vocab_size)
        if place and not isinstance(given, Tensor):
            idx = idx.to(self.device)
        return idx

    # ---- sampling
    def generate(
        self,
        idx: Tensor | Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = False,
        eos_token_id: int | None = None,
    ) -> Tensor | np.ndarray:
        """Continue each row of ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

        ``temperature`` 0 picks the most likely token (greedy); otherwise logits are divided by
        it, optionally cut to the ``top_k`` most likely tokens and/or to the smallest set whose
        probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), and a token
        is drawn with ``numpy.random.default_rng(seed)`` (the global generator when seed is
        None). With ``stop_at_eos`` a row that emits ``eos_token_id`` is padded with it from
        then on, and generation ends early once every row has.

        Each new token costs one position thanks to the key/value cache. Past ``block_size``
        the context is the last ``block_size`` tokens (as nanoGPT crops it). Keys depend on
        absolute positions, so a sliding window cannot shift the cache: once it is full, every
        further token re-runs (re-prefills) the window of the last ``block_size`` tokens. That
        keeps the result identical to re-running the cropped context, at the cost of a full
        window per token beyond block_size.

        Returns (B, T + n) int64, n <= max_new_tokens: a Tensor if ``idx`` is one, else an array.
        """
        as_tensor = isinstance(idx, Tensor)
        where = idx.device if as_tensor else None
        idx = self._check_idx(idx, "idx", limit=math.inf, place=False)
        # sampling runs on the host (one copy of the last logits per token), from the host
        # generator, so a seed gives the same tokens on every device
        tokens = B.to_numpy(idx.data).astype(B.int64)
        _check_ids(tokens, "idx", self.config.vocab_size)
        if tokens.shape[1] == 0:
            raise ValueError("generate: idx needs at least one token per row to condition on")
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive integer, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
        if stop_at_eos and (eos_token_id is None or not 0 <= eos_token_id < self.config.vocab_size):
            raise ValueError(
                f"generate: stop_at_eos needs eos_token_id in [0, {self.config.vocab_size}), "
                f"got {eos_token_id!r}"
            )
        if max_new_tokens == 0:
            return Tensor(tokens, device=where) if as_tensor else tokens
        rng = np.random.default_rng(seed) if seed is not None else default_generator()
        bs, Bsz = self.config.block_size, tokens.shape[0]
        done = np.zeros(Bsz, dtype=bool)
        new: list[np.ndarray] = []
        was_training = self.training
        self.eval()
        # NumPy has no bf16 matmul, so a bf16 weight is cast to float32 at every use: once per
        # token when sampling, which would cost more than the token itself (~0.25 s at 124M
        # vs a few ms of math). Sample with float32 copies instead, and put the originals back.
        stored = {id(p): p.data for p in self.parameters()}
        try:
            for p in self.parameters():
                p.data = p.data.astype(B.float32, copy=False)
            with no_grad():
                cache = self._new_cache(Bsz)
                logits = self._step(tokens[:, -bs:], cache)  # prefill with the prompt
                for step in range(max_new_tokens):
                    nxt = sample_next(logits, temperature, top_k, top_p, rng)
                    if stop_at_eos:
                        nxt[done] = eos_token_id
                        done |= nxt == eos_token_id
                    new.append(nxt)
                    if (stop_at_eos and done.all()) or step == max_new_tokens - 1:
                        break
                    if cache.length == bs:  # window full: slide it by re-running
                        context = np.concatenate([tokens, np.stack(new, axis=1)], axis=1)
                        cache = self._new_cache(Bsz)
                        logits = self._step(context[:, -bs:], cache)
                    else:
                        logits = self._step(nxt[:, None], cache)
        finally:
            for p in self.parameters():
                p.data = stored[id(p)]
            self.train(was_training)
        out = np.concatenate([tokens, *(t[:, None] for t in new)], axis=1)
        return Tensor(out, device=where) if as_tensor else out

    def _new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size, self.device)

    def _step(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run host ``tokens`` (B, T) after the cached positions, appending their keys and
        values; returns the float32 logits (B, V) of the last one, on the host."""
        x = self._hidden(Tensor._make(to_device(tokens, self.device)), cache)
        cache.length += tokens.shape[1]
        # Only the last position's logits are needed: (B, 1, C) @ (C, V) instead of (B, T, V).
        return B.to_numpy(self._logits(x[:, -1:]).data[:, 0].astype(B.float32, copy=False))

    # ---- loading
    @classmethod
    def from_state_dict(cls, config: GPT2Config, state: dict[str, Any]) -> GPT2:
        """A model built from ``config`` holding the arrays of ``state`` (name -> array), cast
        to ``config.dtype``. Missing, unexpected or mis-shaped entries raise one error."""
        model = cls(config)
        model.load_state_dict(state)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, dtype: str | None = None) -> GPT2:
        """Load a checkpoint: ``config.json`` (its "model" section is a
        ``GPT2Config.to_dict()``) and ``model.safetensors``. ``path`` is a checkpoint
        directory, a run directory (the checkpoint its ``latest`` file names) or that
        ``latest`` file (``handgrad.checkpoint.resolve_checkpoint``).

        ``dtype`` ("float32" or "bfloat16") overrides the stored parameter dtype, e.g. float32
        for evaluation: bf16 weights are cast to float32 at every use in the forward pass."""
        checkpoint = resolve_checkpoint(path)
        config_path, weights_path = checkpoint / "config.json", checkpoint / "model.safetensors"
        if not weights_path.is_file():
            raise FileNotFoundError(f"GPT2.from_checkpoint: {weights_path} does not exist")
        # Every file against manifest.json's sizes and hashes, the optimizer's too: a damaged
        # file anywhere means the checkpoint as a whole cannot be trusted.
        verify_manifest(checkpoint, missing_ok=True)
        section = read_config(checkpoint)["model"]
        if dtype is not None:
            section = {**section, "dtype": dtype}
        try:
            config = cls.config_class.from_dict(section)
        except (TypeError, ValueError) as e:
            raise ValueError(f'{config_path}: bad "model" section: {e}') from None
        try:
            return cls.from_state_dict(config, load_file(weights_path, mmap=True))
        except RuntimeError as e:
            raise RuntimeError(f"{weights_path}: {e}") from None


# ----------------------------------------------------------------------------------------
# sampling


def _check_ids(ids: np.ndarray, what: str, vocab_size: int) -> None:
    """Refuse host token ids outside [0, vocab_size), naming the first bad one."""
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"GPT2: token id {lo if lo < 0 else hi} in {what} is outside the vocabulary "
                f"[0, {vocab_size})"
            )


def sample_next(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw one token id per row from logits (B, V) -> (B,) int64.

    temperature 0: argmax. Else p = softmax(logits / temperature), restricted to the top_k
    largest and/or to the nucleus: tokens in order of decreasing p are kept while the mass
    before them is < top_p (so the most likely token always stays), then renormalised.
    """
    if temperature == 0:
        return logits.argmax(axis=-1).astype(B.int64)
    z = logits.astype(np.float64) / temperature
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k : V - top_k + 1]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    # Inverse-CDF sampling: the first index whose cumulative probability exceeds u.
    rng = rng or default_generator()
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(p))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), V - 1).astype(B.int64)
