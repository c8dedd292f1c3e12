"""Supervised fine-tuning on chat data: ``data prepare --format chat`` (template, special
tokens, loss mask), the grown embedding, the masked loss, and a fine-tune that learns the
held-out assistant turns."""

from __future__ import annotations

import json

import numpy as np
import pytest

import handgrad as hg
from handgrad.cli import main
from handgrad.data import TokenShards, get_batch
from handgrad.data.chat import IM_END, IM_START, chat_tokenizer, encode_conversation
from handgrad.models.gpt2 import GPT2
from handgrad.nn import functional as F
from handgrad.parallel import evaluate
from handgrad.tokenizer import BPETokenizer, load_tokenizer
from handgrad.train import train
from handgrad.train.config import from_dict
from handgrad.train.finetune import load_init_weights, start_from

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["apple", "leaf", "sky", "sun", "plum", "carrot", "night", "snow"]


def conversation(i: int) -> dict:
    thing, colour = THINGS[i % 8], COLOURS[i % 8]
    msgs = [{"role": "user", "content": f"Question {i}: what colour is the {thing}?"},
            {"role": "assistant", "content": f"The {thing} is {colour}."}]  # fmt: skip
    if i % 3 == 0:
        msgs.insert(0, {"role": "system", "content": "Answer in one sentence."})
    return {"messages": msgs}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A chat .jsonl, a transformers GPT-2 (random weights) imported with its BPE, and the
    chat data prepared with that run's tokenizer (given as the run directory)."""
    root = tmp_path_factory.mktemp("chat")
    lines = [json.dumps(conversation(i)) for i in range(200)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = " ".join(m["content"] for i in range(200) for m in conversation(i)["messages"])
    tok = BPETokenizer.train(text, vocab_size=256 + 80)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=tok.vocab_size,
        bos_token_id=tok.eot_token, eos_token_id=tok.eot_token,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf")
    tok.export_hf(root / "hf")
    assert main(["import", "hf", "--from", str(root / "hf"), "--out", str(root / "base")]) == 0
    args = ["data", "prepare", "--format", "chat", "--source", str(root / "chat.jsonl"),
            "--tokenizer", str(root / "base"), "--out", str(root / "data")]  # fmt: skip
    assert main(args) == 0
    return root, tok


def test_template_mask_and_tokens(chat):
    root, tok = chat
    grown = chat_tokenizer(tok)
    assert grown.special_tokens[IM_START] == tok.vocab_size
    assert grown.special_tokens[IM_END] == tok.vocab_size + 1
    ids, mask = encode_conversation(grown, conversation(3)["messages"])
    text = grown.decode(ids)
    assert text == (
        "<|endoftext|><|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nQuestion 3: what colour is the sun?<|im_end|>\n"
        "<|im_start|>assistant\nThe sun is yellow.<|im_end|>\n"
    )
    # only the assistant's words and the <|im_end|> closing them are trained on
    assert grown.decode([i for i, m in zip(ids, mask) if m]) == "The sun is yellow.<|im_end|>"
    data = TokenShards(root / "data")
    assert data.load_tokenizer().to_dict() == grown.to_dict()
    assert data.meta["splits"]["val"]["documents"] == 20  # the last 10% of the conversations
    assert len(data.mask("train")) == len(data.train) and data.mask("val").max() == 1


def test_batches_target_only_assistant_tokens(chat):
    root, _ = chat
    data = TokenShards(root / "data")
    x, y = get_batch(data.train, 64, 16, np.random.default_rng(0), data.mask("train"))
    assert (y == -1).any() and ((y != -1).sum(axis=1) > 0).all()  # each window has a target
    tok = data.load_tokenizer()
    kept = tok.decode([int(t) for t in y[y != -1]])
    for n in (1, 3):  # one window: x and y must not share memory
        x1, y1 = get_batch(data.train, n, 16, np.random.default_rng(2), data.mask("train"))
        assert (x1 >= 0).all() and (y1 == -1).any()
    assert "Question" not in kept and "what colour" not in kept


def test_prompt_tokens_contribute_nothing_to_the_gradient(chat):
    root, _ = chat
    data = TokenShards(root / "data")
    x, y = get_batch(data.train, 8, 32, np.random.default_rng(1), data.mask("train"))
    hg.manual_seed(0)
    model = GPT2.from_checkpoint(root / "base")
    vocab = model.config.vocab_size
    x, y = np.minimum(x, vocab - 1), np.where(y >= vocab, -1, y)  # the base model's ids only
    logits = model(x)
    logits.retain_grad()
    F.cross_entropy(logits.reshape(-1, vocab), hg.tensor(y.reshape(-1)), ignore_index=-1).backward()
    g = logits.grad.numpy().reshape(-1, vocab)
    masked = y.reshape(-1) == -1
    assert masked.sum() > 0 and (~masked).sum() > 0
    assert not g[masked].any()  # exactly zero: no prompt position reaches the weights
    assert np.abs(g[~masked]).sum(axis=1).min() > 0


def test_sft_lowers_the_loss_on_held_out_assistant_turns(chat, tmp_path):
    root, _ = chat
    cfg = from_dict({
        "model": {},
        "data": {"source": str(root / "data")},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "train": {"init_from": str(root / "base"), "max_steps": 60, "micro_batch_size": 16,
                  "block_size": 32, "seed": 1, "log_interval": 20, "sample_tokens": 0},
        "eval": {"interval": 0, "batches": 4},
    })  # fmt: skip
    start = start_from(cfg)
    assert start.model.vocab_size == load_tokenizer(root / "base").vocab_size + 2  # grown
    before_model = GPT2(start.model)
    load_init_weights(before_model, start.checkpoint)
    data = TokenShards(root / "data")
    before = evaluate(before_model, data.val, 4, 16, 32, mask=data.mask("val")).loss
    result = train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    after = result.final_eval.loss
    assert after < before - 1.0, (before, after)
    # the new rows started as the mean of the trained ones
    base = GPT2.from_checkpoint(root / "base").transformer.wte.weight.detach().numpy()
    wte = before_model.transformer.wte.weight.detach().numpy()
    old = load_tokenizer(root / "base").vocab_size
    np.testing.assert_allclose(wte[old], base[:old].mean(axis=0), rtol=1e-6, atol=1e-7)
