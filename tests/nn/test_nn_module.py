"""Module bookkeeping against torch.nn.Module: names, sharing, state dicts, modes, dtypes,
printing."""

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad import nn


def build(lib):
    """The same small GPT-like tree in handgrad or torch (``lib`` is a namespace with nn)."""

    class Block(lib.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = lib.nn.LayerNorm(8)
            self.attn = lib.nn.Linear(8, 24)
            self.mlp = lib.nn.Sequential(
                lib.nn.Linear(8, 32), lib.nn.GELU("tanh"), lib.nn.Linear(32, 8)
            )
            self.drop = lib.nn.Dropout(0.1)
            self.register_buffer("mask", lib.ones(4, 4), persistent=False)
            self.register_buffer("scale", lib.ones(8))

    class Tiny(lib.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = lib.nn.ModuleDict(
                dict(
                    wte=lib.nn.Embedding(16, 8),
                    wpe=lib.nn.Embedding(4, 8),
                    h=lib.nn.ModuleList([Block() for _ in range(2)]),
                    ln_f=lib.nn.LayerNorm(8, bias=False),
                )
            )
            self.lm_head = lib.nn.Linear(8, 16, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2

    return Tiny()


def test_named_parameters_match_torch_and_dedupe_shared():
    ours, theirs = build(hg), build(torch)
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in theirs.named_parameters()]
    assert "lm_head.weight" not in names and names[0] == "transformer.wte.weight"
    shapes = [tuple(p.shape) for p in ours.parameters()]
    assert shapes == [tuple(p.shape) for p in theirs.parameters()]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ours.parameters())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [type(m).__name__ for m in ours.children()] == ["ModuleDict", "Linear"]
    assert ours.get_submodule("transformer.h.1.mlp.0") is ours.transformer.h[1].mlp[0]


def test_state_dict_keys_match_torch():
    ours, theirs = build(hg), build(torch)
    sd = ours.state_dict()
    assert list(sd) == list(theirs.state_dict())
    assert "transformer.h.0.mask" not in sd and "transformer.h.0.scale" in sd
    # detached, but sharing memory with the parameter
    w = sd["lm_head.weight"]
    assert type(w) is hg.Tensor and not w.requires_grad
    assert w.data is ours.lm_head.weight.data


def test_load_state_dict_from_torch_is_in_place_and_casts():
    ours, theirs = build(hg), build(torch)
    before = {n: p for n, p in ours.named_parameters()}
    arrays = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    arrays["transformer.h.0.attn.weight"] = arrays["transformer.h.0.attn.weight"].astype(np.float64)
    result = ours.load_state_dict(arrays)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, p in ours.named_parameters():
        assert p is before[name]  # the same Parameter objects (optimizers keep them)
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p.data, theirs.get_parameter(name).detach().numpy())
    # tensors work as values too
    ours.load_state_dict({k: hg.tensor(v) for k, v in arrays.items()})


def test_load_state_dict_reports_every_problem_and_writes_nothing():
    model = build(hg)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    del sd["transformer.h.1.ln_1.bias"]
    del sd["lm_head.weight"]
    sd["transformer.h.0.attn.weight"] = np.zeros((24, 9), dtype=np.float32)
    sd["transformer.wpe.weight"] = np.zeros((5, 8), dtype=np.float32)
    sd["transformer.h.2.attn.weight"] = np.zeros((24, 8), dtype=np.float32)
    sd["transformer.ln_f.weight"] = np.full(8, 7.0, dtype=np.float32)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(sd)
    msg = str(err.value)
    assert "Error(s) in loading state_dict for Tiny" in msg
    assert "Missing key(s) in state_dict: 'transformer.h.1.ln_1.bias', 'lm_head.weight'" in msg
    assert "Unexpected key(s) in state_dict: 'transformer.h.2.attn.weight'" in msg
    assert (
        "size mismatch for transformer.h.0.attn.weight: copying a param with shape (24, 9) "
        "from checkpoint, the shape in current model is (24, 8)" in msg
    )
    assert "size mismatch for transformer.wpe.weight" in msg and "(5, 8)" in msg
    # nothing was written, not even the well-formed ln_f.weight
    np.testing.assert_array_equal(model.transformer.ln_f.weight.data, np.ones(8))

    # strict=False tolerates missing/unexpected keys but still refuses shape mismatches
    with pytest.raises(RuntimeError, match="size mismatch") as err:
        model.load_state_dict(sd, strict=False)
    assert "Missing" not in str(err.value)
    del sd["transformer.h.0.attn.weight"], sd["transformer.wpe.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == [
        "transformer.wpe.weight",
        "transformer.h.0.attn.weight",
        "transformer.h.1.ln_1.bias",
        "lm_head.weight",
    ]
    assert unexpected == ["transformer.h.2.attn.weight"]
    np.testing.assert_array_equal(model.transformer.ln_f.weight.data, np.full(8, 7.0))

    with pytest.raises(
        RuntimeError, match="value for 'transformer.ln_f.weight' has non-numeric dtype object"
    ):
        model.load_state_dict({"transformer.ln_f.weight": object()}, strict=False)
    with pytest.raises(TypeError, match="expected a mapping"):
        model.load_state_dict([("a", 1)])


def test_train_eval_propagate():
    model = build(hg)
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.transformer.h.train()
    assert model.transformer.h[1].drop.training and not model.training
    model.train()
    assert all(m.training for m in model.modules())


def test_zero_grad_and_dtype_casting():
    model = build(hg)
    params = list(model.parameters())
    for p in params:
        p.grad = hg.ones(p.shape)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.data.any() for p in params)
    model.zero_grad()
    assert all(p.grad is None for p in params)

    model.transformer.h[0].register_buffer("index", hg.arange(3))
    w = model.lm_head.weight.data.copy()
    assert model.bfloat16() is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(p.dtype == hg.bfloat16 for p in params)
    assert model.transformer.h[0].scale.dtype == hg.bfloat16
    assert model.transformer.h[0].index.dtype == hg.int64  # integer buffers are left alone
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied
    model.float()
    assert all(p.dtype == np.float32 for p in params)
    np.testing.assert_allclose(model.lm_head.weight.data, w, rtol=2**-8)
    model.to("float64")
    assert model.lm_head.weight.dtype == np.float64
    with pytest.raises(TypeError, match="only floating dtypes"):
        model.to(hg.int32)


def test_repr_matches_torch():
    ours, theirs = build(hg), build(torch)
    assert repr(ours) == repr(theirs)
    assert "(0-1): 2 x Block(" in repr(ours)
    assert repr(nn.Linear(3, 2, bias=False)) == repr(torch.nn.Linear(3, 2, bias=False))
    assert repr(nn.ModuleList()) == repr(torch.nn.ModuleList())
    p = nn.Parameter(hg.zeros(2))
    assert repr(p).startswith("Parameter containing:\ntensor(")


def test_registration_rules():
    m = nn.Module()
    m.w = nn.Parameter(hg.zeros(2))
    m.sub = nn.Linear(2, 2)
    m.plain = hg.zeros(2)  # a plain Tensor attribute is not registered
    assert [n for n, _ in m.named_parameters()] == ["w", "sub.weight", "sub.bias"]
    with pytest.raises(TypeError, match="cannot assign Tensor as parameter 'w'"):
        m.w = hg.zeros(2)
    m.w = None
    assert [n for n, _ in m.named_parameters()] == ["sub.weight", "sub.bias"]
    with pytest.raises(TypeError, match="cannot assign int as child module 'sub'"):
        m.sub = 3
    del m.sub
    assert list(m.parameters()) == []
    with pytest.raises(AttributeError, match="'Module' object has no attribute 'sub'"):
        m.sub  # noqa: B018
    with pytest.raises(KeyError, match="attribute 'plain' already exists"):
        m.register_buffer("plain", hg.zeros(1))
    with pytest.raises(KeyError, match="without '.'"):
        m.register_parameter("a.b", None)

    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(hg.zeros(1))

    with pytest.raises(AttributeError, match="before Forgot.__init__"):
        Forgot()

    shared = nn.Linear(2, 2)
    seq = nn.Sequential(shared, nn.Tanh(), shared)
    assert len(list(seq.parameters())) == 2 and len(list(seq.modules())) == 3
    assert len(seq) == 3 and seq[-1] is shared
    with pytest.raises(IndexError, match="index 3 is out of range for a Sequential of length 3"):
        seq[3]


def test_parameter_shares_tensor_array():
    t = hg.randn(3)
    p = nn.Parameter(t)
    assert p.data is t.data and p.requires_grad and p.is_leaf
    assert not nn.Parameter(t, requires_grad=False).requires_grad
    assert nn.Parameter([1.0, 2.0]).dtype == np.float32
    with pytest.raises(TypeError, match="only floating point tensors"):
        nn.Parameter(hg.arange(3))
    # ops on parameters give plain tensors
    assert type(p * 2) is hg.Tensor and type(p.detach()) is hg.Tensor


def test_apply_and_requires_grad():
    model = build(hg)
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Tiny" and seen.count("Block") == 2
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())
