"""Text sources: local files of each kind, bad input, pydocs, tiny Shakespeare offline."""

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from handgrad.data.sources import build_pydocs_corpus, open_source, shakespeare

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def docs(source, **kw):
    src = open_source(source, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(src.documents()), src.stats


def write_parquet(path, column, values):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({column: values, "url": [f"u{i}" for i in range(len(values))]}), path)


def test_txt_directory_sorted_recursive_and_ignores_other_suffixes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "notes.md").write_text("not data")
    with pytest.warns(UserWarning, match="ignoring 1 file"):
        src = open_source(tmp_path)
    assert list(src.documents()) == ["first", "second", "third"]
    assert src.stats.files == 3 and src.stats.files_ignored == 1


def test_glob(tmp_path):
    for name, text in [("x1.txt", "one"), ("x2.txt", "two"), ("y.txt", "other")]:
        (tmp_path / name).write_text(text)
    got, _ = docs(str(tmp_path / "x*.txt"))
    assert got == ["one", "two"]


def test_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "alpha", "id": 1}, {"body": "beta é", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    got, stats = docs(path, text_field="body")
    assert got == ["alpha", "beta é"]
    assert stats.bad_lines_skipped == 0


def test_utf8_bom_is_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "world"}\n')
    got, _ = docs(tmp_path)
    assert got == ["hello", "world"]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, "content", ["p0", "p1", None, "p3"])
    got, stats = docs(path, text_field="content")
    assert got == ["p0", "p1", "p3"]
    assert stats.empty_documents_skipped == 1  # the null row: counted, not silently dropped


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, "content", ["p0"])
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text' \(columns: content, url\)"):
        docs(path)


def test_empty_file_skipped_counted_and_warned(tmp_path):
    (tmp_path / "a.txt").write_text("real")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("  \n")
    src = open_source(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(src.documents())
    assert got == ["real"]
    assert src.stats.empty_documents_skipped == 2
    messages = [str(w.message) for w in caught]
    assert [m.rsplit("/", 1)[-1] for m in messages] == ["b.txt", "c.txt"]
    assert all(m.startswith("skipping empty document") for m in messages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(src.documents(quiet=True)) == ["real"]
    assert not caught and src.stats.empty_documents_skipped == 2


def test_non_utf8_replaced_and_counted(tmp_path):
    # \xff and \xfe are invalid anywhere in UTF-8; the genuine U+FFFD must not be counted.
    (tmp_path / "a.txt").write_bytes(b"ok \xff mid \xfe end \xef\xbf\xbd")
    src = open_source(tmp_path / "a.txt")
    with pytest.warns(UserWarning, match="2 invalid UTF-8"):
        (text,) = list(src.documents())
    assert text == "ok \ufffd mid \ufffd end \ufffd"
    assert src.stats.documents_with_replacement == 1
    assert src.stats.replacement_chars == 2


def test_jsonl_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        docs(path)


def test_jsonl_missing_field_names_file_line_and_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: no 'text' field \(keys: 'body'\)"):
        docs(path)


def test_jsonl_skip_bad_lines_counts(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\nnot json\n{"body": 1}\n{"text": 5}\n{"text": "b"}\n')
    got, stats = docs(path, skip_bad_lines=True)
    assert got == ["a", "b"]
    assert stats.bad_lines_skipped == 3


def test_nonexistent_source_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*pydocs, shakespeare, openwebtext"):
        open_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.txt' matches no files"):
        open_source(str(tmp_path / "*.txt"))
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="contains no .txt, .jsonl, .parquet files"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported file type '\.md'"):
        open_source(tmp_path / "only.md")


def test_pydocs_deterministic_and_size():
    a = build_pydocs_corpus()
    b = build_pydocs_corpus()
    sha = [hashlib.sha256(json.dumps(c).encode()).hexdigest() for c in (a, b)]
    assert sha[0] == sha[1]
    n_bytes = sum(len(d["text"].encode()) for d in a)
    assert 1_000_000 < n_bytes < 3_000_000
    titles = [d["title"] for d in a]
    assert "topic for" in titles and "module json" in titles
    assert not any(t.split()[1].split(".")[0] in {"this", "antigravity", "tkinter"} for t in titles)
    assert 'The "for" statement' in next(d["text"] for d in a if d["title"] == "topic for")


def test_shakespeare_offline_message(tmp_path, monkeypatch):
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    monkeypatch.setattr(shakespeare, "local_shakespeare_candidates", lambda: [])
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HANDGRAD_SHAKESPEARE", raising=False)
    with pytest.raises(ConnectionError) as info:
        open_source("shakespeare")
    message = str(info.value)
    assert "--source path/to/input.txt" in message and "HANDGRAD_SHAKESPEARE" in message
    assert not list((tmp_path / "cache").glob("*"))  # no partial download left behind


def test_shakespeare_env_copy_checked(tmp_path, monkeypatch):
    wrong = tmp_path / "input.txt"
    wrong.write_text("not shakespeare")
    monkeypatch.setenv("HANDGRAD_SHAKESPEARE", str(wrong))
    with pytest.raises(ValueError, match="sha256 .* does not match tiny Shakespeare"):
        open_source("shakespeare")


def test_shakespeare_from_env_and_cache(tmp_path, monkeypatch):
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    monkeypatch.setenv("HANDGRAD_SHAKESPEARE", str(path))
    (text,), _ = docs("shakespeare")
    assert text.startswith("First Citizen:") and len(text) == 1_115_394
    # A verified copy in the cache is used without network.
    monkeypatch.delenv("HANDGRAD_SHAKESPEARE")
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    monkeypatch.setattr(shakespeare, "local_shakespeare_candidates", lambda: [])
    (tmp_path / "tinyshakespeare.txt").write_bytes(path.read_bytes())
    assert open_source("shakespeare").description.startswith(f"shakespeare: {tmp_path}")


def test_openwebtext_rows_missing_field():
    src = open_source("openwebtext", rows=[{"text": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="openwebtext row 1: no 'text' field"):
        list(src.documents())


def test_openwebtext_offline_is_one_message(monkeypatch):
    import types

    from handgrad.data.sources import openwebtext

    class ConnectError(Exception):  # as httpx names it
        pass

    def load_dataset(*args, **kwargs):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    fake = types.SimpleNamespace(load_dataset=load_dataset)
    monkeypatch.setattr(openwebtext, "import_optional", lambda name: fake)
    with pytest.raises(RuntimeError) as err:
        list(openwebtext.openwebtext_rows("hf://datasets/x/data/train-*.parquet"))
    message = str(err.value)
    assert "cannot be reached" in message and "HANDGRAD_OPENWEBTEXT_DATA_FILES" in message
    assert "ConnectError: [Errno -3]" in message
