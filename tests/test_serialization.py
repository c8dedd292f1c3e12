"""Our safetensors reader/writer: round trips, interop with the reference library, bad files."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save

from handgrad.serialization import SafetensorsError, load_file, load_metadata, save_file


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "d": rng.standard_normal(4),
        "i": rng.integers(-5, 5, size=(2, 2, 2)),
        "u": rng.integers(0, 60000, size=7).astype(np.uint16),
        "bf": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.asarray(rng.standard_normal(), dtype=np.float32),
    }


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_every_dtype(tmp_path, mmap):
    arrays = _arrays(np.random.default_rng(0))
    save_file(arrays, tmp_path / "x.safetensors", metadata={"step": "3"})
    back = load_file(tmp_path / "x.safetensors", mmap=mmap)
    assert back.keys() == arrays.keys()
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        assert back[k].tobytes() == a.tobytes(), k
    assert load_metadata(tmp_path / "x.safetensors") == {"step": "3"}


def test_files_interoperate_with_the_reference_library(tmp_path):
    arrays = {k: v for k, v in _arrays(np.random.default_rng(1)).items() if k != "bf"}
    save_file(arrays, tmp_path / "ours.safetensors")
    theirs = st_load(tmp_path / "ours.safetensors")
    for k, a in arrays.items():
        assert np.array_equal(theirs[k], a)
    st_save(arrays, tmp_path / "theirs.safetensors")
    ours = load_file(tmp_path / "theirs.safetensors")
    for k, a in arrays.items():
        assert np.array_equal(ours[k], a)


def test_bfloat16_is_read_by_the_reference_library_as_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as st_load_torch

    a = np.random.default_rng(2).standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    save_file({"a": a}, tmp_path / "b.safetensors")
    t = st_load_torch(tmp_path / "b.safetensors")["a"]
    assert t.dtype == torch.bfloat16
    assert np.array_equal(t.float().numpy(), a.astype(np.float32))


def test_truncated_file_is_refused_with_its_name(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"w": np.ones((10, 10), np.float32)}, p)
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors.*(truncated|corrupt)"):
        load_file(p)


def test_garbage_and_bad_headers_are_refused(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short"):
        load_file(p)
    p.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        load_file(p)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="needs 8 bytes"):
        load_file(p)
    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="unknown dtype 'Q7'"):
        load_file(p)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_file(tmp_path / "missing.safetensors")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "keep.safetensors"
    save_file({"w": np.arange(3, dtype=np.float32)}, p)
    with pytest.raises(TypeError, match="unsupported dtype"):
        save_file({"w": np.array(["text"])}, p)
    assert np.array_equal(load_file(p)["w"], np.arange(3, dtype=np.float32))
    assert [f.name for f in tmp_path.iterdir()] == ["keep.safetensors"]


def test_hg_save_and_load_a_module_state_dict(tmp_path):
    import handgrad as hg
    import handgrad.nn as nn

    hg.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    path = tmp_path / "model.safetensors"
    hg.save(model.state_dict(), path)
    back = hg.load(path)
    assert isinstance(back, dict)
    assert sorted(back) == sorted(model.state_dict())
    for name, t in model.state_dict().items():
        assert isinstance(back[name], hg.Tensor)
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert np.array_equal(back[name].numpy(), t.detach().numpy()), name
    # the file is plain safetensors: the reference library reads the same numbers
    theirs = st_load(path)
    assert np.array_equal(theirs["0.weight"], model.state_dict()["0.weight"].detach().numpy())
    # and it loads into a fresh model of the same shape
    hg.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert not np.array_equal(other[0].weight.detach().numpy(), model[0].weight.detach().numpy())
    other.load_state_dict(hg.load(path))
    assert np.array_equal(other[0].weight.detach().numpy(), model[0].weight.detach().numpy())


def test_hg_save_keeps_bfloat16_and_takes_arrays(tmp_path):
    import handgrad as hg

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    state = {"bf": hg.Tensor(a.astype(ml_dtypes.bfloat16)), "raw": a}
    hg.save(state, tmp_path / "s.safetensors")
    back = hg.load(tmp_path / "s.safetensors")
    assert back["bf"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(back["bf"].numpy().astype(np.float32), a)
    assert back["raw"].dtype == np.float32 and np.array_equal(back["raw"].numpy(), a)


def test_hg_save_and_load_refuse_bad_input(tmp_path):
    import handgrad as hg

    with pytest.raises(TypeError, match="state dict"):
        hg.save([np.ones(2)], tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="keys must be str"):
        hg.save({1: np.ones(2)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(SafetensorsError, match=r"empty\.safetensors.*too short"):
        hg.load(tmp_path / "empty.safetensors")
    (tmp_path / "foreign.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a zip file
    with pytest.raises(SafetensorsError, match=r"foreign\.safetensors"):
        hg.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        hg.load(tmp_path / "nope.safetensors")
