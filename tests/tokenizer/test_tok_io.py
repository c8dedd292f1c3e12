"""Tokenizer files: save/load round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest

from handgrad.tokenizer import BPETokenizer, CharTokenizer, TokenizerFileError, load_tokenizer


def test_bpe_save_load_round_trip(small_tok, varied_texts, tmp_path):
    path = tmp_path / "tok.json"
    small_tok.save(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == "handgrad-tokenizer" and obj["version"] == 1
    assert obj["type"] == "bpe" and obj["vocab_size"] == 600
    assert len(obj["merges"]) == 343 and obj["special_tokens"] == {"<|endoftext|>": 599}
    # merges are byte sequences in hex, in rank order
    a, b = small_tok.merges[0]
    assert obj["merges"][0] == [small_tok.decoder[a].hex(), small_tok.decoder[b].hex()]
    for loaded in (load_tokenizer(path), BPETokenizer.load(path)):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.merges == small_tok.merges
        assert loaded.encoder == small_tok.encoder
        assert loaded.special_tokens == small_tok.special_tokens
        assert loaded.pattern == small_tok.pattern
        for text in varied_texts:
            assert loaded.encode(text) == small_tok.encode(text)
    assert not [p for p in tmp_path.iterdir() if p.name != "tok.json"]  # no temp files left


def test_non_utf8_token_bytes_survive(tmp_path):
    # tokens that are not valid UTF-8 on their own (pieces of multi-byte characters)
    tok = BPETokenizer.train(["日本語 日本語 日本"] * 3, 270, show_progress=False)
    assert any(not _is_utf8(tok.decoder[i]) for i in range(256, 269))
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encoder == tok.encoder


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_save_replaces_existing_file(small_tok, tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("old", encoding="utf-8")
    small_tok.save(path)
    assert load_tokenizer(path).vocab_size == 600


def _saved(small_tok, tmp_path) -> tuple[dict, object]:
    path = tmp_path / "tok.json"
    small_tok.save(path)
    return json.loads(path.read_text(encoding="utf-8")), path


def _write(path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_truncated_file(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    path.write_text(path.read_text(encoding="utf-8")[:1000], encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"tok.json: not valid JSON \(truncated"):
        load_tokenizer(path)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerFileError, match="nope.json: no such file"):
        load_tokenizer(tmp_path / "nope.json")


def test_foreign_hf_tokenizer_json(small_tok, tmp_path):
    pytest.importorskip("tokenizers")
    small_tok.export_hf(tmp_path)
    with pytest.raises(
        TokenizerFileError, match="tokenizer.json: not a handgrad tokenizer.*Hugging Face"
    ):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2, 3]", '"text"'])
def test_random_json(tmp_path, content):
    path = tmp_path / "random.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="random.json"):
        load_tokenizer(path)


def test_wrong_version(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["version"] = 99
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="unsupported format version 99"):
        load_tokenizer(path)


def test_unknown_type(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["type"] = "wordpiece"
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="unknown tokenizer \"type\" 'wordpiece'"):
        load_tokenizer(path)


def test_inconsistent_vocab_size(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["vocab_size"] = 601
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="inconsistent vocab_size: the file says 601"):
        load_tokenizer(path)


def test_merge_with_unknown_token(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["merges"][5] = ["616263646566", "20"]  # "abcdef" is no token
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match=r"merge 5 references unknown token b'abcdef'"):
        load_tokenizer(path)


def test_merge_not_hex(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["merges"][0] = ["zz", "20"]
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="merge 0 is not a pair of hex"):
        load_tokenizer(path)


def test_missing_key(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    del obj["byte_ids"]
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match='missing key "byte_ids"'):
        load_tokenizer(path)


def test_bad_pattern(small_tok, tmp_path):
    obj, path = _saved(small_tok, tmp_path)
    obj["pattern"] = "(unclosed"
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match='"pattern" is not a valid regex'):
        load_tokenizer(path)


def test_type_mismatch_on_class_load(small_tok, tmp_path):
    small_tok.save(tmp_path / "bpe.json")
    CharTokenizer.train("abc").save(tmp_path / "char.json")
    with pytest.raises(TokenizerFileError, match='not "char"'):
        CharTokenizer.load(tmp_path / "bpe.json")
    with pytest.raises(TokenizerFileError, match='not "bpe"'):
        BPETokenizer.load(tmp_path / "char.json")


def test_char_file_errors(tmp_path):
    path = tmp_path / "c.json"
    CharTokenizer.train("hello").save(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    obj["vocab_size"] = 9
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="c.json: inconsistent vocab_size"):
        load_tokenizer(path)
    obj["vocab_size"] = 4
    obj["chars"] = ["a", "a", "b", "cd"]
    _write(path, obj)
    with pytest.raises(TokenizerFileError, match="single characters"):
        load_tokenizer(path)


def test_load_tokenizer_reads_handgrads_own_directories(tmp_path):
    from handgrad.data import prepare
    from handgrad.tokenizer import load_tokenizer

    (tmp_path / "corpus.txt").write_text("to be or not to be " * 200, encoding="utf-8")
    out = tmp_path / "prepared"
    prepare(str(tmp_path / "corpus.txt"), "train:270", out, val_fraction=0.1, workers=1,
            progress=False)  # fmt: skip
    saved = load_tokenizer(out / "tokenizer.json")
    # a prepared directory, a checkpoint-like directory and a run directory (through latest)
    assert load_tokenizer(out).to_dict() == saved.to_dict()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (tmp_path / "run" / "latest").write_text("checkpoints/step_0000001\n")
    assert load_tokenizer(ckpt).to_dict() == saved.to_dict()
    assert load_tokenizer(tmp_path / "run").to_dict() == saved.to_dict()
