import json

import pytest

from handgrad.fileio import atomic_path, write_json_atomic, write_text_atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    write_json_atomic(p, {"x": "é"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"x": "é"}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_failure_keeps_old_file_and_removes_temporary(tmp_path):
    p = tmp_path / "a.txt"
    write_text_atomic(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk went away")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_suffix_is_kept_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.name.endswith(".png")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_atomic_dir_publishes_whole_or_not_at_all(tmp_path):
    from handgrad.fileio import atomic_dir

    out = tmp_path / "ckpt"
    with atomic_dir(out) as d:
        (d / "a").write_text("1")
        assert not out.exists()  # nothing under the real name until the block ends
    assert (out / "a").read_text() == "1"

    with pytest.raises(FileExistsError, match="not an empty directory"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, replace=True) as d:
            (d / "b").write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in out.iterdir()] == ["a"]  # the old directory is untouched

    with atomic_dir(out, replace=True) as d:
        (d / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
