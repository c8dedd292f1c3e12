"""`data prepare` end to end: every source kind, splits, EOT placement, dtype, determinism."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from handgrad.cli import main as cli_main
from handgrad.data import load_meta, load_split, prepare, token_dtype
from handgrad.data.prepare import PreparationRefused
from handgrad.data.sources import openwebtext
from handgrad.tokenizer import CharTokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
EOT = "<|endoftext|>"

# Small multi-document corpus: distinct documents so each can be recognised after decoding.
DOCS = [
    f"Document number {i}: the quick brown fox {'jumps ' * (i % 4)}over dog {i}." for i in range(40)
]


def run(source, tokenizer, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(source, tokenizer, out, **kw)


def write_txt_dir(root, docs):
    root.mkdir()
    for i, text in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def write_parquet(path, docs, column="text"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({column: docs}), path, row_group_size=7)
    return path


def split_at_eot(tokens, eot):
    """Token runs between end-of-text tokens (each must be terminated by one)."""
    tokens = [int(t) for t in tokens]
    assert not tokens or tokens[-1] == eot, "every document ends with <|endoftext|>"
    pieces, current = [], []
    for t in tokens:
        if t == eot:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces


def decoded_documents(out):
    """{split: [document text]} read back through the saved tokenizer."""
    meta = load_meta(out)
    tok = load_tokenizer(out / "tokenizer.json")
    eot = meta["eot_token"]
    assert eot == tok.eot_token and tok.decode([eot]) == EOT
    return {
        s: [tok.decode(p) for p in split_at_eot(load_split(out, s), eot)] for s in ("train", "val")
    }


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A small BPE tokenizer learnt by prepare (train:N) on the corpus, reused by other tests."""
    root = tmp_path_factory.mktemp("bpe")
    out = root / "out"
    run(write_txt_dir(root / "txt", DOCS), "train:300", out, val_fraction=0.1)
    return out / "tokenizer.json"


def test_txt_dir_eot_after_every_document_and_split_by_document(tmp_path, bpe_file):
    out = tmp_path / "out"
    meta = run(write_txt_dir(tmp_path / "txt", DOCS), bpe_file, out, val_fraction=0.2)
    got = decoded_documents(out)
    # Every document appears exactly once, whole, in one split; order within a split is kept.
    assert sorted(got["train"] + got["val"]) == sorted(DOCS)
    assert got["train"] == [d for d in DOCS if d in got["train"]]
    assert 2 <= len(got["val"]) <= 16  # ~20% of 40, decided by a hash
    assert meta["splits"]["train"]["documents"] == len(got["train"])
    assert meta["splits"]["val"]["documents"] == len(got["val"])
    assert meta["split_mode"] == "document"
    for split in ("train", "val"):
        n = meta["splits"][split]["tokens"]
        assert (out / f"{split}.bin").stat().st_size == 2 * n
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_train_tokenizer_saved_and_learnt_on_train_only(tmp_path):
    # The val document holds a word that appears nowhere in train: if BPE had seen it, a
    # 300-token vocabulary would have merged its frequent repeats into few tokens.
    train_docs = [f"alpha beta gamma {i} " * 3 for i in range(30)]
    secret = "zyxwvqzyxwvq " * 50
    docs = [*train_docs, secret]
    root = tmp_path / "txt"
    root.mkdir()
    for i, d in enumerate(docs):
        (root / f"{i:02d}.txt").write_text(d)
    # Find a seed that puts exactly the secret document in val.
    from handgrad.data.prepare import is_val_document

    seed = next(
        s
        for s in range(10_000)
        if [i for i in range(len(docs)) if is_val_document(i, s, 0.02)] == [len(docs) - 1]
    )
    out = tmp_path / "out"
    run(root, "train:300", out, val_fraction=0.02, seed=seed)
    tok = load_tokenizer(out / "tokenizer.json")
    assert decoded_documents(out)["val"] == [secret]
    assert len(tok.encode_ordinary("zyxwvq")) >= 5  # no merges learnt from the val document
    assert len(tok.encode_ordinary(" alpha beta gamma")) <= 4


def test_glob_and_jsonl_custom_field_and_parquet_agree(tmp_path, bpe_file):
    txt = write_txt_dir(tmp_path / "txt", DOCS)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "n": 1}) + "\n" for d in DOCS))
    parquet = write_parquet(tmp_path / "d.parquet", DOCS)
    outs = {
        "glob": (str(txt / "doc*.txt"), {}),
        "jsonl": (jsonl, {"text_field": "body"}),
        "parquet": (parquet, {}),
    }
    shards = {}
    for name, (src, kw) in outs.items():
        run(src, bpe_file, tmp_path / name, val_fraction=0.1, **kw)
        shards[name] = [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin")]
    # Same documents in the same order -> the same tokens, whatever the container.
    assert shards["glob"] == shards["jsonl"] == shards["parquet"]
    assert sorted(sum(decoded_documents(tmp_path / "parquet").values(), [])) == sorted(DOCS)


def test_openwebtext_through_datasets_streaming(tmp_path, monkeypatch, bpe_file):
    # Offline and with a private cache, before `datasets` is first imported (it reads these then).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pytest.importorskip("datasets")
    parquet = write_parquet(tmp_path / "owt.parquet", DOCS)
    # The real loading code, pointed at a local file with OpenWebText's schema.
    monkeypatch.setattr(openwebtext, "OPENWEBTEXT_DATA_FILES", str(parquet))
    meta = run("openwebtext", bpe_file, tmp_path / "owt", val_fraction=0.1)
    run(parquet, bpe_file, tmp_path / "local", val_fraction=0.1)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "owt" / f).read_bytes() == (tmp_path / "local" / f).read_bytes()
    assert meta["source"].startswith("openwebtext")
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == len(DOCS)
    # An override of the shard location (a mirror or a local copy) goes through the same code.
    other = write_parquet(tmp_path / "mirror.parquet", DOCS)
    monkeypatch.setenv("HANDGRAD_OPENWEBTEXT_DATA_FILES", str(other))
    meta = run("openwebtext", bpe_file, tmp_path / "mirror", val_fraction=0.1)
    assert meta["source"] == f"openwebtext: {other}"
    assert (tmp_path / "mirror" / "val.bin").read_bytes() == (
        tmp_path / "owt" / "val.bin"
    ).read_bytes()
    # Injected rows (any iterable of dicts) take the same path.
    run(
        "openwebtext",
        bpe_file,
        tmp_path / "rows",
        val_fraction=0.1,
        rows=[{"text": d} for d in DOCS],
    )
    assert (tmp_path / "rows" / "train.bin").read_bytes() == (
        tmp_path / "owt" / "train.bin"
    ).read_bytes()


def test_shakespeare_char_matches_nanogpt(tmp_path, monkeypatch):
    path = SHARED / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    monkeypatch.setenv("HANDGRAD_SHAKESPEARE", str(path))
    out = tmp_path / "out"
    meta = run("shakespeare", "char", out, val_fraction=0.1, workers=2)
    assert meta["splits"]["train"]["tokens"] == 1_003_854
    assert meta["splits"]["val"]["tokens"] == 111_540
    assert meta["vocab_size"] == 65 and meta["eot_token"] is None
    assert meta["split_mode"] == "position"
    # nanoGPT's shakespeare_char/prepare.py, written out independently.
    text = path.read_text(encoding="utf-8")
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    n = len(text)
    expected_train = np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16)
    expected_val = np.array([stoi[c] for c in text[int(n * 0.9) :]], dtype=np.uint16)
    np.testing.assert_array_equal(load_split(out, "train"), expected_train)
    np.testing.assert_array_equal(load_split(out, "val"), expected_val)


def test_single_document_bpe_split_by_position_eot_only_at_end(tmp_path, bpe_file):
    text = " ".join(DOCS)
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "out"
    meta = run(tmp_path / "one.txt", bpe_file, out, val_fraction=0.25)
    tok = load_tokenizer(bpe_file)
    train, val = load_split(out, "train"), load_split(out, "val")
    eot = tok.eot_token
    assert eot not in train.tolist() and val.tolist().count(eot) == 1 and val[-1] == eot
    cut = int(len(text) * 0.75)
    assert tok.decode(train.tolist()) == text[:cut]
    assert tok.decode(val[:-1].tolist()) == text[cut:]
    assert meta["split_mode"] == "position"


def test_dtype_selection(tmp_path):
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    # A char tokenizer over more than 65,536 distinct characters needs uint32 ids.
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    meta = run(tmp_path / "big.txt", "char", tmp_path / "out", val_fraction=0.0)
    assert meta["vocab_size"] == len(chars) > 65_536
    assert meta["dtype"] == "uint32"
    train = load_split(tmp_path / "out", "train")
    assert train.dtype == np.uint32 and train.max() == len(chars) - 1  # sorted: last char, last id
    assert len(load_split(tmp_path / "out", "val")) == 0


def test_char_no_eot_and_vocab_covers_val(tmp_path):
    docs = ["abc", "abd", "xyz!", "aab", "bca"]
    out = tmp_path / "out"
    meta = run(write_txt_dir(tmp_path / "txt", docs), "char", out, val_fraction=0.4)
    tok = CharTokenizer.train("".join(docs))
    assert meta["vocab_size"] == len(set("".join(docs))) == tok.vocab_size
    got = tok.decode(load_split(out, "train").tolist()) + tok.decode(
        load_split(out, "val").tolist()
    )
    assert sorted(got) == sorted("".join(docs))  # no EOT, nothing else added


def test_at_least_one_val_document(tmp_path, bpe_file):
    # 2 documents at val_fraction 0.001: the hash almost surely sends both to train, so the rule
    # "val gets at least one when val_fraction > 0" must kick in.
    out = tmp_path / "out"
    meta = run(write_txt_dir(tmp_path / "txt", DOCS[:2]), bpe_file, out, val_fraction=0.001)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1
    meta = run(
        write_txt_dir(tmp_path / "txt2", DOCS[:2]), bpe_file, tmp_path / "o2", val_fraction=0
    )
    assert meta["splits"]["val"]["documents"] == 0


def test_deterministic_and_workers_byte_identical(tmp_path):
    src = write_txt_dir(tmp_path / "txt", DOCS)
    files = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
    outs = []
    for name, workers in [("a", 1), ("b", 1), ("c", 2)]:
        # Small chunks so that workers really share the work.
        run(src, "train:280", tmp_path / name, val_fraction=0.1, workers=workers, chunk_chars=300)
        outs.append([(tmp_path / name / f).read_bytes() for f in files])
    assert outs[0] == outs[1] == outs[2]


def test_skip_and_replace_counts_in_meta(tmp_path, bpe_file):
    root = tmp_path / "txt"
    root.mkdir()
    (root / "a.txt").write_text("good document")
    (root / "b.txt").write_text("")
    (root / "c.txt").write_bytes(b"bad \xff byte")
    (root / "d.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        run(root, bpe_file, tmp_path / "out")
    meta = run(root, bpe_file, tmp_path / "out", skip_bad_lines=True)
    assert meta["empty_documents_skipped"] == 1
    assert meta["bad_lines_skipped"] == 1
    assert meta["documents_with_replacement"] == 1 and meta["replacement_chars"] == 1
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_another_preparation_into_the_directory_is_refused(tmp_path, bpe_file):
    out = tmp_path / "out"
    src = write_txt_dir(tmp_path / "txt", DOCS)
    good = run(src, bpe_file, out, val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "ok"}\n')
    with pytest.raises(PreparationRefused, match=r"holds another finished preparation") as info:
        run(other, bpe_file, out)
    assert "source: this command" in str(info.value) and f"delete {out}" in str(info.value)
    with pytest.raises(PreparationRefused, match=r"val_fraction: this command 0.2"):
        run(src, bpe_file, out, val_fraction=0.2)
    with pytest.raises(PreparationRefused, match=r"tokenizer: this command 'char'"):
        run(src, "char", out, val_fraction=0.1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files either
    # the same command again: nothing to do, the same meta
    assert run(src, bpe_file, out, val_fraction=0.1) == good == load_meta(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a directory with other files is not a preparation
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PreparationRefused, match=r"files that are not a preparation \(notes.txt\)"):
        run(src, bpe_file, tmp_path / "busy")


def test_failed_start_leaves_no_directory(tmp_path, bpe_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    for tokenizer in (bpe_file, "train:300"):
        with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
            run(bad, tokenizer, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()  # an empty directory given by the user stays, empty
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        run(bad, bpe_file, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_bad_tokenizer_spec(tmp_path):
    (tmp_path / "a.txt").write_text("x y")
    with pytest.raises(ValueError, match="expected a tokenizer .json file, 'char' or 'train:N'"):
        run(tmp_path / "a.txt", "gpt2", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        run(tmp_path / "a.txt", str(tmp_path / "missing.json"), tmp_path / "out")
    with pytest.raises(ValueError, match="train:N with an integer N"):
        run(tmp_path / "a.txt", "train:many", tmp_path / "out")


def test_cli_prepare(tmp_path, bpe_file, capsys):
    src = write_txt_dir(tmp_path / "txt", DOCS)
    rc = cli_main(
        [
            "data",
            "prepare",
            "--source",
            str(src),
            "--tokenizer",
            str(bpe_file),
            "--out",
            str(tmp_path / "out"),
            "--val-fraction",
            "0.1",
            "--workers",
            "1",
        ]
    )
    assert rc == 0
    meta = load_meta(tmp_path / "out")
    said = capsys.readouterr()
    assert f"train {meta['splits']['train']['tokens']:,} tokens" in said.out
    # a few documents leave a val split too small to validate on: said when it is written
    assert meta["splits"]["val"]["tokens"] < 4096
    assert "warning: the val split holds only" in said.err
    rc = cli_main(
        [
            "data",
            "prepare",
            "--source",
            str(tmp_path / "nope"),
            "--tokenizer",
            "char",
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "meta.json").exists()
