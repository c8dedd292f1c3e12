"""A handgrad checkpoint as an lm-evaluation-harness model, registered under the name ``handgrad``.

    lm_eval --model handgrad --model_args checkpoint=runs/x,batch_size=8 --tasks lambada_openai

(``handgrad eval zero-shot`` does the same in-process.) Importing this module registers the
class; ``lm-eval`` is the optional extra ``handgrad[eval]``.

What lm-eval asks of a model, and how it is answered here (as its own ``hf`` model does, so
the two give the same numbers on the same weights):

- ``loglikelihood((context, continuation))``: log P(continuation | context) summed over the
  continuation's tokens, and whether greedy decoding would produce exactly those tokens (every
  continuation token is the argmax of its position's distribution). lm-eval's ``TemplateLM``
  tokenizes: trailing spaces of the context move to the continuation, and the continuation's
  tokens are those of encode(context + continuation) after encode(context). An empty context
  becomes the end-of-text token.
- The model sees the last ``block_size + 1`` tokens of context + continuation minus the final
  one (whose prediction is never needed): contexts that are too long lose tokens on the left.
  Requests run longest first, ``batch_size`` at a time, right-padded (a causal model's outputs
  at real positions do not depend on padding that comes after them).
- ``loglikelihood_rolling(text)``: log P(text) with no truncation, for perplexities. The
  tokens are cut into disjoint windows of at most ``block_size`` predictions with
  ``lm_eval.utils.get_rolling_token_windows`` (context_len=1) and ``make_disjoint_window``,
  the first one conditioned on the end-of-text token, and the windows' sums are added.
- ``generate_until(context, {until, max_gen_toks, do_sample, temperature, ...})``: greedy (or
  sampled) continuation from ``GPT2.generate`` with its key/value cache, cut at the first stop
  sequence (the end-of-text text is always one); the context keeps its last
  ``block_size - max_gen_toks`` tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

try:
    import lm_eval.models  # noqa: F401  (fills the registry first, so "hf" & co stay available)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "handgrad.eval.lm_eval_model needs lm-evaluation-harness: pip install 'handgrad[eval]' "
        f"(or pip install lm-eval) ({e})"
    ) from None

from tqdm import tqdm

from handgrad import backend as B
from handgrad.checkpoint import resolve_checkpoint
from handgrad.eval.load import load_checkpoint_tokenizer, load_model
from handgrad.grad_mode import no_grad

# A request as TemplateLM hands it to _loglikelihood_tokens: (cache key, context, continuation).
TokenRequest = tuple[Any, list[int], list[int]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p = z - logsumexp(z) over the last axis, in float64 (the sums of many log-probs
    that perplexities are made of should not inherit float32 rounding)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@register_model("handgrad")
class HandgradLM(TemplateLM):
    """lm-eval model over a handgrad checkpoint (a checkpoint or run directory)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        model: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """``checkpoint`` names the directory; alternatively pass ``model`` (a GPT2) and
        ``tokenizer`` objects. ``max_length`` (default: the model's block_size) caps the tokens
        per forward pass. ``prefix_token_id`` (default: end-of-text) conditions the first
        token of a text. lm-eval's generic ``device`` ('cpu', 'cuda', 'cuda:N') puts the model
        there; ``max_batch_size`` is accepted and ignored (one fixed batch size)."""
        super().__init__()
        unknown = set(kwargs) - {"device", "max_batch_size", "dtype", "trust_remote_code"}
        if unknown:
            raise ValueError(
                f"handgrad lm-eval model: unknown model_args {sorted(unknown)} (known: "
                "checkpoint, batch_size, max_length, max_gen_toks, prefix_token_id)"
            )
        if model is None:
            if checkpoint is None:
                raise ValueError("handgrad lm-eval model: pass model_args checkpoint=DIR")
            ckpt = resolve_checkpoint(checkpoint)
            device = kwargs.get("device")
            model = load_model(ckpt, None if device in (None, "") else str(device))
            tokenizer = load_checkpoint_tokenizer(ckpt)
        elif tokenizer is None:
            raise ValueError("handgrad lm-eval model: a model object needs a tokenizer too")
        self.model = model
        self.model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        if str(batch_size).startswith("auto"):
            batch_size = 1
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"handgrad lm-eval model: batch_size must be >= 1, got {batch_size}")
        self._max_length = int(max_length) if max_length else self.config.block_size
        if not 1 <= self._max_length <= self.config.block_size:
            raise ValueError(
                f"handgrad lm-eval model: max_length {max_length} must be in "
                f"[1, block_size = {self.config.block_size}]"
            )
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)

    # ---- the properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        eot = getattr(self.tokenizer, "eot_token", None)
        if eot is None:
            raise ValueError(
                "handgrad lm-eval model: the tokenizer has no end-of-text token, which lm-eval "
                "uses to condition a text's first token; pass model_args prefix_token_id=ID"
            )
        return int(eot)

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id if self._prefix_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    # ---- tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any):
        # Special-token text (e.g. "<|endoftext|>") becomes the special token, as HF's
        # tokenizers do; no BOS is ever prepended (GPT-2 has none).
        if hasattr(self.tokenizer, "special_tokens") and self.tokenizer.special_tokens:
            return self.tokenizer.encode(string, allowed_special="all")
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring
    def _forward_log_probs(self, rows: list[list[int]]) -> np.ndarray:
        """Token rows (each <= max_length long) -> log-probabilities (B, T_max, vocab), rows
        right-padded with token 0 (positions past a row's end are garbage and never read)."""
        T = max(len(r) for r in rows)
        idx = np.zeros((len(rows), T), dtype=B.int64)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = r
        with no_grad():
            logits = self.model(idx).data  # the model puts idx on its own device
        return log_softmax(B.to_numpy(logits))

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(key, context tokens, continuation tokens) -> (sum of log-probs, is_greedy)."""
        # Longest first, as lm-eval's own models: the first batch is the largest, so a memory
        # problem shows at once and the progress bar over-estimates rather than under-.
        order = sorted(
            range(len(requests)), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), i)
        )
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(
            total=len(requests), disable=disable_tqdm, desc="handgrad loglikelihood", leave=False
        )
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = []
            for i in batch:
                _, context, continuation = requests[i]
                if not context or not continuation:
                    raise ValueError(
                        "handgrad lm-eval model: a request has an empty context or continuation"
                    )
                if len(continuation) > self.max_length:
                    raise ValueError(
                        f"handgrad lm-eval model: a continuation of {len(continuation)} tokens "
                        f"exceeds max_length = {self.max_length}"
                    )
                # Keep the last max_length + 1 tokens (left truncation), drop the final one:
                # its prediction would be of the token after the continuation.
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
            log_probs = self._forward_log_probs(rows)
            for i, row, lp in zip(batch, rows, log_probs):
                continuation = requests[i][2]
                n = len(continuation)
                # Positions len(row)-n .. len(row)-1 predict the continuation's n tokens.
                cont_lp = lp[len(row) - n : len(row)]
                picked = cont_lp[np.arange(n), continuation]
                greedy = bool((cont_lp.argmax(axis=-1) == np.asarray(continuation)).all())
                results[i] = (float(picked.sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """Disjoint (context, predicted) windows covering ``tokens``, each predicted token once,
        every window using up to max_length tokens of context (lm-eval's utilities)."""
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
        ]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args
            for context, predicted in self.rolling_windows(self.tok_encode(text)):
                windows.append((None, context, predicted))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id])
        out: list[str] = []
        for req in tqdm(requests, disable=disable_tqdm, desc="handgrad generate", leave=False):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs), eos_text)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate_one(self, context: str, kwargs: dict[str, Any], eos_text: str) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if eos_text not in until:
            until.append(eos_text)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:
            temperature = 0.0
        top_k = kwargs.pop("top_k", None)
        top_p = kwargs.pop("top_p", None)
        if max_gen >= self.max_length:
            raise ValueError(
                f"handgrad lm-eval model: max_gen_toks {max_gen} must be below max_length "
                f"{self.max_length}"
            )
        tokens = self.tok_encode(context)[-(self.max_length - max_gen) :]
        if not tokens:
            tokens = [self.prefix_token_id]
        generated: list[int] = []
        for chunk in self._generate_chunks(tokens, max_gen, temperature, top_k, top_p):
            generated += chunk
            text = self.tok_decode(generated)
            cut = _first_stop(text, until)
            if cut is not None:
                return text[:cut]
        return self.tok_decode(generated)

    def _generate_chunks(
        self, tokens: list[int], n: int, temperature: float, top_k: Any, top_p: Any
    ) -> Iterator[list[int]]:
        """New tokens in chunks, so that a stop sequence ends generation early: each chunk is
        one ``generate`` call (KV cache inside) on the context so far."""
        chunk = 32
        context = list(tokens)
        while n > 0:
            k = min(chunk, n)
            out = self.model.generate(
                np.asarray([context[-self.max_length :]], dtype=B.int64),
                max_new_tokens=k,
                temperature=temperature,
                top_k=None if top_k is None else int(top_k),
                top_p=None if top_p is None else float(top_p),
            )
            new = [int(t) for t in out[0, len(context[-self.max_length :]) :]]
            context += new
            n -= len(new)
            yield new
            if not new:
                return


def _first_stop(text: str, until: list[str]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, or None."""
    hits = [text.find(s) for s in until if s and s in text]
    return min(hits) if hits else None
