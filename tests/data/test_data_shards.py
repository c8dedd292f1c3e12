"""Shard reader (validated against meta.json) and batch sampling."""

import json
import warnings

import numpy as np
import pytest

from handgrad.data import (
    TokenShards,
    get_batch,
    iter_batches_sequential,
    load_meta,
    load_split,
    prepare,
)


@pytest.fixture
def prepared(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(5000))
    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(tmp_path / "doc.txt", "char", out, val_fraction=0.1, workers=1, progress=False)
    return out


def test_token_shards_exposes_meta(prepared):
    data = TokenShards(prepared)
    assert data.vocab_size == 26 and data.eot_token is None
    assert len(data.train) == 4500 and len(data.val) == 500
    assert data.tokenizer_path == prepared / "tokenizer.json"
    assert data.train[:3].tolist() == [0, 1, 2]
    tok = data.load_tokenizer()
    assert tok.decode(data.val[:3].tolist()) == "cde"  # characters 4500.. of the text
    assert isinstance(data.train, np.memmap)


def test_truncated_shard_refused(prepared):
    path = prepared / "train.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"train\.bin is 8999 bytes but meta\.json expects 9000"):
        load_split(prepared, "train")
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(prepared)


def test_missing_meta_or_shard_refused(prepared):
    (prepared / "val.bin").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"val\.bin not found \(meta\.json expects 1000 bytes"
    ):
        load_split(prepared, "val")
    (prepared / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found"):
        load_split(prepared, "train")
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found"):
        TokenShards(prepared)


def test_foreign_format_version_and_replaced_tokenizer_refused(prepared):
    meta = load_meta(prepared)
    (prepared / "tokenizer.json").write_text((prepared / "tokenizer.json").read_text() + " ")
    with pytest.raises(ValueError, match="sha256 .* does not match meta.json"):
        TokenShards(prepared).load_tokenizer()
    meta["format_version"] = 99
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        load_meta(prepared)


def test_get_batch_shift_and_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=16, block_size=8, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == np.int64
    # tokens[i] == i, so each row must be a run start..start+7 and y the run shifted by one.
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))
    np.testing.assert_array_equal(y, x + 1)
    assert x.min() >= 0 and y.max() <= 999


def test_get_batch_reaches_both_ends_of_the_data():
    tokens = np.arange(10, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=500, block_size=4, rng=np.random.default_rng(1))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3, 4, 5}  # starts 0..len-block_size-1
    assert y.max() == 9


def test_get_batch_deterministic_and_resumable_from_json_state():
    tokens = np.random.default_rng(123).integers(0, 50000, size=10_000).astype(np.uint16)
    a = np.random.default_rng(7)
    b = np.random.default_rng(7)
    for _ in range(3):
        xa, ya = get_batch(tokens, 4, 32, a)
        xb, yb = get_batch(tokens, 4, 32, b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    state = json.loads(json.dumps(a.bit_generator.state))  # what a checkpoint stores
    expected = get_batch(tokens, 4, 32, a)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = state
    got = get_batch(tokens, 4, 32, resumed)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_too_short_split_clear_error():
    with pytest.raises(ValueError, match=r"split has 8 tokens, fewer than block_size \+ 1 = 9"):
        get_batch(np.arange(8), 2, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fewer than block_size"):
        next(iter_batches_sequential(np.arange(8), 2, 8, 1))
    x, y = get_batch(np.arange(9), 2, 8, np.random.default_rng(0))  # exactly enough
    np.testing.assert_array_equal(x, [np.arange(8)] * 2)


def test_iter_batches_sequential_fixed_and_evenly_spaced():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(iter_batches_sequential(tokens, batch_size=2, block_size=10, n_batches=3))
    assert len(batches) == 3
    starts = [int(s) for x, _ in batches for s in x[:, 0]]
    # 6 windows from the first start (0) to the last possible one (1001 - 10 - 1 = 990).
    assert starts == [0, 198, 396, 594, 792, 990]
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)
    again = list(iter_batches_sequential(tokens, 2, 10, 3))
    assert all((a[0] == b[0]).all() for a, b in zip(batches, again))
