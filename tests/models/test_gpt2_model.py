"""GPT2 forward/backward against a PyTorch implementation of the same architecture, bf16
storage, input errors and checkpoint loading."""

import json
import math

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.serialization import save_file


class TorchGPT2(torch.nn.Module):
    """nanoGPT's model written compactly with functional torch ops; parameters by name."""

    def __init__(self, config: GPT2Config, state: dict[str, np.ndarray]):
        super().__init__()
        self.c = config
        self.p = torch.nn.ParameterDict(
            {k.replace(".", "/"): torch.nn.Parameter(torch.tensor(v)) for k, v in state.items()}
        )

    def w(self, name):
        return self.p[name.replace(".", "/")]

    def ln(self, x, name):
        return torch.nn.functional.layer_norm(
            x, (self.c.n_embd,), self.w(name + ".weight"), self.w(name + ".bias"), 1e-5
        )

    def lin(self, x, name):
        return torch.nn.functional.linear(x, self.w(name + ".weight"), self.w(name + ".bias"))

    def forward(self, idx, targets):
        c = self.c
        B, T = idx.shape
        wte = self.w("transformer.wte.weight")
        x = wte[idx] + self.w("transformer.wpe.weight")[torch.arange(T)]
        for i in range(c.n_layer):
            h = f"transformer.h.{i}."
            q, k, v = self.lin(self.ln(x, h + "ln_1"), h + "attn.c_attn").split(c.n_embd, dim=2)
            q, k, v = (a.view(B, T, c.n_head, -1).transpose(1, 2) for a in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, c.n_embd)
            x = x + self.lin(y, h + "attn.c_proj")
            m = torch.nn.functional.gelu(
                self.lin(self.ln(x, h + "ln_2"), h + "mlp.c_fc"), approximate="tanh"
            )
            x = x + self.lin(m, h + "mlp.c_proj")
        x = self.ln(x, "transformer.ln_f")
        logits = x @ wte[: c.vocab_size].T
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, c.vocab_size), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def compare_with_torch(config, B, T, seed):
    hg.manual_seed(seed)
    model = GPT2(config)
    # Non-trivial LayerNorm parameters and biases, so their gradients are tested too.
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data[...] += rng.normal(0, 0.05, p.shape).astype(np.float32)
    state = {k: v.data.copy() for k, v in model.state_dict().items()}
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[0, :3] = -1  # ignored positions

    logits, loss = model(hg.tensor(idx), hg.tensor(targets))
    loss.backward()

    ref = TorchGPT2(config, state)
    t_logits, t_loss = ref(torch.tensor(idx), torch.tensor(targets))
    t_loss.backward()

    assert logits.shape == (B, T, config.vocab_size)
    assert rel_err(logits.data, t_logits.detach().numpy()) < 1e-4
    assert abs(loss.item() - t_loss.item()) / abs(t_loss.item()) < 1e-5
    for name, p in model.named_parameters():
        expected = ref.w(name).grad.numpy()
        assert p.grad is not None, name
        assert rel_err(p.grad.data, expected) < 1e-4, name
    # The padding rows of wte take part in nothing, so their gradient is exactly zero.
    assert np.all(model.transformer.wte.weight.grad.data[config.vocab_size :] == 0)


def test_matches_torch_small():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61)
    assert config.padded_vocab_size == 64
    compare_with_torch(config, B=3, T=16, seed=0)
    compare_with_torch(config, B=2, T=7, seed=1)  # shorter than the block


def test_matches_torch_block_1024():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=1024, vocab_size=61)
    compare_with_torch(config, B=1, T=1024, seed=2)


def test_no_bias_variant_runs_and_learns_signal():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, bias=False)
    model = GPT2(config)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    _, loss = model(np.zeros((2, 8), np.int64), np.ones((2, 8), np.int64))
    loss.backward()
    # random init: the loss is close to log(V) for near-uniform predictions
    assert abs(loss.item() - math.log(20)) < 0.1


def test_all_targets_ignored_gives_nan_like_torch():
    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10)
    _, loss = GPT2(config)(np.zeros((1, 4), np.int64), np.full((1, 4), -1))
    assert math.isnan(loss.item())


def test_bf16_storage_matches_f32_with_rounded_weights():
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61, dtype="bfloat16"
    )
    hg.manual_seed(0)
    model = GPT2(config)
    assert all(p.dtype == hg.bfloat16 for p in model.parameters())
    f32 = GPT2.from_state_dict(
        GPT2Config.from_dict({**config.to_dict(), "dtype": "float32"}),
        {k: v.data.astype(np.float32) for k, v in model.state_dict().items()},
    )
    idx = np.random.default_rng(0).integers(0, 61, (2, 16))
    logits, loss = model(idx, idx)
    ref_logits, ref_loss = f32(idx, idx)
    assert logits.dtype == hg.float32  # the forward computes in float32
    assert rel_err(logits.data, ref_logits.data) < 1e-5
    loss.backward()
    ref_loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), f32.named_parameters()):
        assert p.dtype == hg.bfloat16 and p.grad.dtype == hg.float32, name
        assert rel_err(p.grad.data, q.grad.data) < 1e-4, name


def test_input_errors():
    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10)
    model = GPT2(config)
    with pytest.raises(ValueError, match="sequence of length 5, block_size is only 4"):
        model(np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="token id 10 .* outside the vocabulary"):
        model(np.array([[1, 10]]))  # 10 is a padding row, not a token
    with pytest.raises(ValueError, match=r"\(batch, time\) array of integer"):
        model(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"\(batch, time\) array of integer"):
        model(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"targets have shape \(1, 3\)"):
        model(np.zeros((1, 4), np.int64), np.zeros((1, 3), np.int64))


def write_checkpoint(directory, model):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    save_file({k: v.data for k, v in model.state_dict().items()}, directory / "model.safetensors")


def test_from_checkpoint_and_latest(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    old, new = GPT2(config), GPT2(config)
    write_checkpoint(tmp_path / "step_1", old)
    write_checkpoint(tmp_path / "step_2", new)
    idx = np.array([[1, 2, 3]])
    loaded = GPT2.from_checkpoint(tmp_path / "step_1")
    assert np.array_equal(loaded(idx).data, old(idx).data)
    (tmp_path / "latest").write_text("step_2\n")
    loaded = GPT2.from_checkpoint(tmp_path)
    assert loaded.config == config
    assert np.array_equal(loaded(idx).data, new(idx).data)
    assert not np.array_equal(loaded(idx).data, old(idx).data)


def test_from_checkpoint_errors(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        GPT2.from_checkpoint(tmp_path / "nope")
    write_checkpoint(tmp_path / "ck", GPT2(config))
    (tmp_path / "latest").write_text("missing")
    with pytest.raises(FileNotFoundError, match="names 'missing'"):
        GPT2.from_checkpoint(tmp_path)
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model": {"n_layr": 1}}))
    with pytest.raises(ValueError, match=r"config.json: bad \"model\" section: .*'n_layr'"):
        GPT2.from_checkpoint(tmp_path / "ck")
    bigger = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=4, vocab_size=10)
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model": bigger.to_dict()}))
    with pytest.raises(
        RuntimeError, match="(?s)model.safetensors: .*size mismatch for transformer.wte.weight"
    ):
        GPT2.from_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        GPT2.from_checkpoint(tmp_path / "ck")


def test_from_checkpoint_dtype_override(tmp_path):
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10, dtype="bfloat16"
    )
    model = GPT2(config)
    write_checkpoint(tmp_path / "ck", model)
    assert all(p.dtype == hg.bfloat16 for p in GPT2.from_checkpoint(tmp_path / "ck").parameters())
    f32 = GPT2.from_checkpoint(tmp_path / "ck", dtype="float32")
    assert f32.config.dtype == "float32"
    for p, q in zip(f32.parameters(), model.parameters()):
        assert p.dtype == hg.float32 and np.array_equal(p.data, q.data.astype(np.float32))
