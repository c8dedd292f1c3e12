"""The ops of the Llama-style block against PyTorch: rms_norm, swiglu, rotary_embedding and
grouped-query attention (keys and values broadcast over the query heads of their group)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _torchref import DTYPES, compare

import handgrad as hg
import handgrad.nn.functional as F


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,norm", [((4, 6), (6,)), ((2, 3, 6), (6,)), ((2, 3, 4), (3, 4)), ((2, 1), (1,))], ids=str
)
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm(shape, norm, weight, dtype, rng):
    x = rng.standard_normal(shape) * 2 + 0.5
    params = [rng.standard_normal(norm)] if weight else []
    compare(
        lambda t, *p: F.rms_norm(t, norm if len(norm) > 1 else norm[0], *p, eps=1e-5),
        lambda t, *p: TF.rms_norm(t, norm, *p, eps=1e-5),
        x,
        *params,
        dtype=dtype,
        rng=rng,
    )


def test_rms_norm_checks_shapes(rng):
    x = hg.tensor(rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="does not end with"):
        F.rms_norm(x, 3)
    with pytest.raises(ValueError, match="weight has shape"):
        F.rms_norm(x, 4, hg.tensor(np.ones(3)))


def _torch_swiglu(x):
    a, b = x.chunk(2, dim=-1)
    return TF.silu(a) * b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 10), (2,)], ids=str)
def test_swiglu(shape, dtype, rng):
    x = rng.standard_normal(shape) * 3
    x.flat[0] = -60.0  # far out on the negative side: no overflow, gradient ~0
    compare(F.swiglu, _torch_swiglu, x, dtype=dtype, rng=rng)


def test_swiglu_needs_an_even_last_axis(rng):
    with pytest.raises(ValueError, match="even"):
        F.swiglu(hg.tensor(rng.standard_normal((2, 3))))


def _torch_rotary(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, full-width tables."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * torch.cat((cos, cos), dim=-1) + rotated * torch.cat((sin, sin), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (5, 4), (1, 2, 1, 2)], ids=str)
def test_rotary_embedding(shape, dtype, rng):
    T, D = shape[-2:]
    cos, sin = F.rope_tables(D, 10 + T, theta=500.0)
    cos, sin = cos[10:].astype(np.float64), sin[10:].astype(np.float64)  # positions 10..
    compare(
        lambda t: F.rotary_embedding(t, cos, sin),
        lambda t: _torch_rotary(t, torch.from_numpy(cos), torch.from_numpy(sin)),
        rng.standard_normal(shape),
        dtype=dtype,
        rng=rng,
    )


def test_rope_tables_match_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32)
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 32, 16)
    cos_ref, sin_ref = rope(x, torch.arange(32)[None])
    cos, sin = F.rope_tables(16, 32)
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_ref[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_ref[0].numpy(), atol=1e-5)


def test_rotary_embedding_checks_shapes(rng):
    cos, sin = F.rope_tables(8, 4)
    with pytest.raises(ValueError, match="cos, sin"):
        F.rotary_embedding(hg.tensor(rng.standard_normal((2, 5, 8))), cos, sin)
    with pytest.raises(ValueError, match="even"):
        F.rope_tables(7, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_query_attention(groups, dtype, rng):
    """Llama's GQA as the model computes it: queries (B, n_kv, groups, T, hd) against keys and
    values (B, n_kv, 1, T, hd), broadcast over each group; torch's enable_gqa is the
    reference (query head h reads key head h // groups)."""
    Bsz, n_kv, T, hd = 2, 2, 5, 4
    q = rng.standard_normal((Bsz, n_kv * groups, T, hd))
    k, v = rng.standard_normal((2, Bsz, n_kv, T, hd))

    def ours(q, k, v):
        y = F.scaled_dot_product_attention(
            q.reshape(Bsz, n_kv, groups, T, hd),
            k.reshape(Bsz, n_kv, 1, T, hd),
            v.reshape(Bsz, n_kv, 1, T, hd),
            is_causal=True,
        )
        return y.reshape(Bsz, n_kv * groups, T, hd)

    compare(
        ours,
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        q,
        k,
        v,
        dtype=dtype,
        rng=rng,
    )
