"""The zero-shot suite through lm-eval on local fixture data: (a) the handgrad model and
lm-eval's own hf model on the exported weights agree; (b) every task's metric equals the
number computed here by hand from the model's log-probabilities."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: E402

from handgrad.eval.zero_shot import SUITES, run_zero_shot  # noqa: E402
from handgrad.tensor import Tensor  # noqa: E402


@pytest.fixture(scope="module")
def ours(run_dir, task_data):
    return run_zero_shot(suite="gpt2-paper", checkpoint=run_dir, data_dir=task_data,
                         batch_size=4, bootstrap_iters=0)  # fmt: skip


@pytest.fixture(scope="module")
def theirs(hf_dir, task_data):
    return run_zero_shot(
        suite="gpt2-paper", model="hf", data_dir=task_data, batch_size=4, bootstrap_iters=0,
        model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
    )  # fmt: skip


def metric(results, task, name):
    return results["results"][task][f"{name},none"]


def test_handgrad_and_hf_models_agree(ours, theirs):
    assert set(ours["results"]) == set(SUITES["gpt2-paper"])
    compared = 0
    for task, values in ours["results"].items():
        for key, value in values.items():
            if not isinstance(value, float) or "stderr" in key:
                continue
            other = theirs["results"][task][key]
            if key.startswith("acc"):
                assert value == other, (task, key)
            else:
                assert value == pytest.approx(other, rel=1e-4), (task, key)
            compared += 1
    assert compared >= 18
    accs = [metric(ours, t, "acc") for t in ("lambada_openai", "hg_cbt_cn", "hg_cbt_ne")]
    assert any(0 < a < 1 for a in accs)  # the fixture model is neither always right nor wrong


# ---- hand computations


def log_probs(model, ids):
    logits = model(Tensor(np.asarray([ids]))).data[0].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def loglik(model, context, continuation):
    T = model.config.block_size
    seq = (context + continuation)[-(T + 1) :]
    lp = log_probs(model, seq[:-1])
    n = len(continuation)
    rows = lp[len(seq) - 1 - n :]
    return sum(rows[i, t] for i, t in enumerate(continuation)), all(
        rows[i].argmax() == t for i, t in enumerate(continuation)
    )


def rolling(model, eot, ids):
    """log P(ids): chunks of T predictions; the first conditioned on eot, the others on the
    token before them; the last chunk (shorter) sees the T tokens before the end."""
    T, n, total, start = model.config.block_size, len(ids), 0.0, 0
    while start < n:
        end = min(start + T, n)
        if start == 0:
            total += loglik(model, [eot], ids[:end])[0]
        elif end - start == T:
            total += loglik(model, [ids[start - 1]], ids[start:end])[0]
        else:
            total += loglik(model, ids[:start], ids[start:end])[0]
        start = end
    return total


def words(text):
    return len(re.split(r"\s+", text))


def test_word_level_tasks_by_hand(ours, model, tokenizer, docs):
    eot = tokenizer.eot_token
    cases = {
        "hg_wikitext103": [(p, wikitext_detokenizer({"page": p})) for p in docs.WIKI_PAGES],
        "hg_wikitext2": [(docs.WIKI_PAGES[0], wikitext_detokenizer({"page": docs.WIKI_PAGES[0]}))],
        # the PTB split is one document; detokenized by hand
        "hg_ptb": [
            (
                "\n".join(docs.PTB),
                "the dog said it wasn't cold in the village\n"
                "mary's mother bought N apples for $N\nthe king lit a great fire",
            )
        ],
        "hg_lm1b": [
            (docs.LM1B[0], "The king said to the queen that the castle was cold."),
            (docs.LM1B[1], "Tom walked along the river, and Mary saw a boat."),
        ],
    }
    for task, pages in cases.items():
        ll = sum(rolling(model, eot, tokenizer.encode(target)) for _, target in pages)
        n_words = sum(words(page) for page, _ in pages)
        n_bytes = sum(len(page.encode()) for page, _ in pages)
        assert metric(ours, task, "word_perplexity") == pytest.approx(
            math.exp(-ll / n_words), rel=1e-5), task  # fmt: skip
        assert metric(ours, task, "byte_perplexity") == pytest.approx(
            math.exp(-ll / n_bytes), rel=1e-5), task  # fmt: skip
        assert metric(ours, task, "bits_per_byte") == pytest.approx(
            -ll / n_bytes / math.log(2), rel=1e-5), task  # fmt: skip


def test_character_level_tasks_by_hand(ours, model, tokenizer, docs):
    eot = tokenizer.eot_token
    texts = {
        "hg_enwik8": docs.WIKI_PAGES[0],  # rows are its lines, joined back with newlines
        "hg_text8": " the king lit a great fire and the dog slept",
    }
    for task, text in texts.items():
        ll = rolling(model, eot, tokenizer.encode(text))
        bpb = -ll / len(text.encode()) / math.log(2)
        assert metric(ours, task, "bits_per_byte") == pytest.approx(bpb, rel=1e-5), task
        assert "word_perplexity,none" not in ours["results"][task]


def test_lambada_by_hand(ours, model, tokenizer, docs):
    lls, hits = [], []
    for text in docs.LAMBADA:
        context, last = text.rsplit(" ", 1)
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + " " + last)[len(ctx) :]
        ll, greedy = loglik(model, ctx, cont)
        lls.append(ll)
        hits.append(greedy)
    assert metric(ours, "lambada_openai", "acc") == pytest.approx(np.mean(hits))
    assert metric(ours, "lambada_openai", "perplexity") == pytest.approx(
        math.exp(-np.mean(lls)), rel=1e-5)  # fmt: skip


def test_cbt_by_hand(ours, model, tokenizer, docs):
    for task, rows in (("hg_cbt_cn", docs.CBT), ("hg_cbt_ne", docs.CBT[::-1])):
        correct = []
        for doc in rows:
            before, after = doc["question"].split("XXXXX")
            context = " ".join(doc["sentences"]) + " " + before.rstrip(" ")
            moved = before[len(before.rstrip(" ")) :]
            ctx = tokenizer.encode(context)
            scores = []
            for option in doc["options"]:
                filled = tokenizer.encode(context + moved + option + after)
                scores.append(loglik(model, ctx, filled[len(ctx) :])[0])
            correct.append(doc["options"][int(np.argmax(scores))] == doc["answer"])
        assert metric(ours, task, "acc") == pytest.approx(np.mean(correct)), task


def test_results_json_and_cli(run_dir, task_data, tmp_path, capsys):
    from handgrad.cli import main

    out = tmp_path / "zs.json"
    code = main(["eval", "zero-shot", "--checkpoint", str(run_dir), "--tasks", "hg_cbt_cn",
                 "--data-dir", str(task_data), "--limit", "2", "--bootstrap-iters", "0",
                 "--output", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "hg_cbt_cn" in printed and "|" in printed
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"hg_cbt_cn"}
    assert saved["config"]["limit"] == 2


def test_missing_local_data_is_a_clear_error(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="hg_ptb/test.jsonl"):
        run_zero_shot(tasks="hg_ptb", checkpoint=run_dir, data_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        run_zero_shot(tasks="hg_ptb", suite="gpt2-paper", checkpoint=run_dir)
