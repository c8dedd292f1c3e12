"""The lm-eval model class on hand-computed log-likelihoods (the model's own forward pass,
log-softmax done here in NumPy, windows laid out here by index arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from handgrad.eval.lm_eval_model import HandgradLM  # noqa: E402
from handgrad.tensor import Tensor  # noqa: E402


def log_probs(model, ids: list[int]) -> np.ndarray:
    """(len(ids), V) float64 log-probabilities of the next token after each prefix."""
    logits = model(Tensor(np.asarray([ids]))).data[0].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and greediness, with the input cut to block_size."""
    T = model.config.block_size
    seq = (context + continuation)[-(T + 1) :]
    lp = log_probs(model, seq[:-1])
    n = len(continuation)
    rows = lp[len(seq) - 1 - n :]
    total = sum(rows[i, continuation[i]] for i in range(n))
    greedy = all(rows[i].argmax() == continuation[i] for i in range(n))
    return float(total), greedy


@pytest.fixture(scope="module")
def lm(run_dir):
    return HandgradLM(checkpoint=str(run_dir), batch_size=3)


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_matches_hand_computation(lm, model, tokenizer):
    pairs = [
        ("The king said to the queen that the castle was", " cold"),
        ("Tom and Mary walked along the", " river. Mary saw a boat"),
        ("", "Once upon a time"),
        ("She went to the market with her mother ", "and they"),
    ]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if not context:  # an empty context is the end-of-text token
            ctx, cont = [tokenizer.eot_token], tokenizer.encode(continuation)
        else:  # trailing spaces of the context belong to the continuation
            c = context.rstrip(" ")
            ctx = tokenizer.encode(c)
            cont = tokenizer.encode(c + context[len(c) :] + continuation)[len(ctx) :]
        want, want_greedy = score(model, ctx, cont)
        assert logprob == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert greedy == want_greedy


def test_is_greedy_and_left_truncation(lm, model, tokenizer):
    context = tokenizer.encode(" ".join(["the dog sleeps in the sun"] * 8))  # > block_size
    assert len(context) > model.config.block_size
    # The model sees the last T tokens of context + continuation minus the final token:
    # here context[-(T-1):] + [g1], so g1 is predicted from the last T-1 context tokens.
    window = context[-(model.config.block_size - 1) :]
    lp = log_probs(model, window)
    g1 = int(lp[-1].argmax())
    lp2 = log_probs(model, window + [g1])
    g2 = int(lp2[-1].argmax())
    greedy = [g1, g2]
    not_greedy = [g1, (g2 + 1) % tokenizer.vocab_size]
    out = lm._loglikelihood_tokens([(None, context, greedy), (None, context, not_greedy)])
    assert out[0][1] is True and out[1][1] is False
    for (logprob, _), cont in zip(out, (greedy, not_greedy)):
        assert logprob == pytest.approx(score(model, context, cont)[0], rel=1e-6)
    # by its parts: log p(g1 | window) + log p(g2 | window, g1)
    assert out[0][0] == pytest.approx(lp[-1][g1] + lp2[-1][g2], rel=1e-6)


def test_batch_size_and_order_do_not_change_results(run_dir, lm, tokenizer):
    requests = [
        (None, tokenizer.encode(t), tokenizer.encode(" x y"))
        for t in ("a", "the dog sleeps in the sun", "Once upon a time there", "b c")
    ]
    one = HandgradLM(checkpoint=str(run_dir), batch_size=1)._loglikelihood_tokens(requests)
    many = lm._loglikelihood_tokens(requests)
    assert [g for _, g in one] == [g for _, g in many]
    np.testing.assert_allclose([s for s, _ in one], [s for s, _ in many], rtol=1e-6)
    assert len({s for s, _ in one}) == 4  # four different requests, four different scores


def test_loglikelihood_rolling_is_each_token_once_in_disjoint_windows(lm, model, tokenizer):
    text = " ".join(["It was a dark and stormy night; the rain fell in torrents."] * 2)
    ids = tokenizer.encode(text)
    T = model.config.block_size
    n = len(ids)
    assert 2 * T < n < 3 * T
    # Window 1: [eot] + ids[:T-1] predicts ids[:T]. Window 2: ids[T-1:2T-1] predicts ids[T:2T].
    # Last window: the T tokens before the end predict the remaining n - 2T tokens.
    total = 0.0
    lp = log_probs(model, [tokenizer.eot_token] + ids[: T - 1])
    total += sum(lp[i, ids[i]] for i in range(T))
    lp = log_probs(model, ids[T - 1 : 2 * T - 1])
    total += sum(lp[i, ids[T + i]] for i in range(T))
    lp = log_probs(model, ids[n - T - 1 : n - 1])
    rest = n - 2 * T
    total += sum(lp[T - rest + i, ids[2 * T + i]] for i in range(rest))
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(total, rel=1e-6)
    assert got < 0 and math.isfinite(got)


def test_generate_until_is_greedy_and_stops(lm, model, tokenizer):
    prompt = "The king said to the queen that"
    ids = tokenizer.encode(prompt)
    out = model.generate(np.asarray([ids]), max_new_tokens=12, temperature=0.0)
    full = tokenizer.decode(out[0, len(ids) :].tolist())
    (text,) = lm.generate_until([req("generate_until", prompt, {"max_gen_toks": 12})])
    assert text == full.split("<|endoftext|>")[0]
    stop = full.strip()[:3]
    (cut,) = lm.generate_until(
        [req("generate_until", prompt, {"until": [stop], "max_gen_toks": 12})]
    )
    assert cut == full[: full.find(stop)]


def test_generate_until_matches_lm_eval_hf_model(lm, hf_dir):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)
    requests = [
        req("generate_until", "Once upon a time", {"until": ["."], "max_gen_toks": 10}),
        req("generate_until", "Tom and Mary", {"max_gen_toks": 8, "do_sample": False}),
    ]
    assert lm.generate_until(requests) == hf.generate_until(requests)


def test_bad_model_args(run_dir):
    with pytest.raises(ValueError, match="unknown model_args"):
        HandgradLM(checkpoint=str(run_dir), temperature=3)
    with pytest.raises(ValueError, match="max_length"):
        HandgradLM(checkpoint=str(run_dir), max_length=10_000)
