"""A directory holding only a Hugging Face tokenizer.json (what transformers >= 5 saves for a fast
GPT-2 tokenizer): from_hf, load_tokenizer and the CLI read it; other kinds are refused."""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys

import pytest

from handgrad.tokenizer import ENDOFTEXT, BPETokenizer, load_tokenizer
from handgrad.tokenizer.bytelevel import bytes_to_unicode
from handgrad.tokenizer.cli import register

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

PAD = "<pad>"


def hf_train(docs: list[str], vocab_size: int, layout: str):
    """A byte-level BPE trained by `tokenizers`. "first": BpeTrainer puts <|endoftext|> and
    <pad> before the bytes (ids 0, 1); "last": they are added after training, as GPT-2's
    <|endoftext|> (ids vocab_size, vocab_size + 1)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, PAD] if layout == "first" else [],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(docs, trainer)
    if layout == "last":
        hf.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, PAD)]
        )
    return hf


def save_pretrained(hf, directory):
    """`GPT2TokenizerFast.save_pretrained`, keeping only tokenizer.json and
    tokenizer_config.json (transformers < 5 also writes vocab.json + merges.txt)."""
    fast = transformers.GPT2TokenizerFast(
        tokenizer_object=hf, eos_token=ENDOFTEXT, bos_token=ENDOFTEXT, unk_token=ENDOFTEXT
    )
    fast.save_pretrained(str(directory))
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert {p.name for p in directory.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)


def rewrite_merges(path, form: str) -> None:
    """Write model.merges as "a b" strings or ["a", "b"] pairs (`tokenizers` reads both)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"]]
    doc["model"]["merges"] = [" ".join(p) for p in pairs] if form == "string" else pairs
    path.write_text(json.dumps(doc), encoding="utf-8")


@pytest.fixture(scope="module", params=["first", "last"])
def trained(request, corpus):
    return request.param, hf_train(corpus, 600, request.param)


@pytest.mark.parametrize("form", ["string", "pair"])
def test_from_hf_tokenizer_json_only(trained, form, varied_texts, tmp_path):
    layout, hf = trained
    save_pretrained(hf, tmp_path)
    rewrite_merges(tmp_path / "tokenizer.json", form)
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"][
        "merges"
    ]
    assert all(isinstance(m, str if form == "string" else list) for m in merges)
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))

    tok = BPETokenizer.from_hf(tmp_path)
    n = hf.get_vocab_size()
    expected_specials = (
        {ENDOFTEXT: 0, PAD: 1} if layout == "first" else {ENDOFTEXT: n - 2, PAD: n - 1}
    )
    assert tok.special_tokens == expected_specials
    assert fast.convert_tokens_to_ids([ENDOFTEXT, PAD]) == list(expected_specials.values())
    assert tok.vocab_size == n == len(fast)
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    hf_merges = (
        [tuple(bytes(u2b[c] for c in s) for s in m.split(" ")) for m in merges]
        if form == "string"
        else [tuple(bytes(u2b[c] for c in s) for s in m) for m in merges]
    )
    assert [(tok.decoder[a], tok.decoder[b]) for a, b in tok.merges] == hf_merges
    texts = [
        *varied_texts,
        f"{ENDOFTEXT}starts with it and ends with it{ENDOFTEXT}",
        f"{PAD}{PAD} kato rine{ENDOFTEXT}\n{PAD}",
    ]
    for text in texts:
        ids = fast(text)["input_ids"]
        assert tok.encode(text, allowed_special="all") == ids, repr(text)
        assert tok.decode(ids) == text
    ends = tok.encode(texts[-2], allowed_special="all")
    assert ends[0] == ends[-1] == expected_specials[ENDOFTEXT]


def test_load_tokenizer_and_cli_read_the_directory(trained, tmp_path, monkeypatch, capsys):
    _, hf = trained
    save_pretrained(hf, tmp_path / "hf")
    text = f"the end{ENDOFTEXT} and {PAD} more"
    ids = hf.encode(text).ids
    assert load_tokenizer(tmp_path / "hf").encode(text, allowed_special="all") == ids
    parser = argparse.ArgumentParser(prog="handgrad")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["tokenizer", "encode", "--tokenizer", str(tmp_path / "hf"), "--text", text]
    args = parser.parse_args([*argv, "--allow-special"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in ids]


def test_gpt2_files_come_before_tokenizer_json(small_tok, tmp_path):
    small_tok.export_hf(tmp_path)
    doc = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    doc["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    assert BPETokenizer.from_hf(tmp_path).encoder == small_tok.encoder  # read from the pair
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(ValueError, match="normalizer is 'NFC'"):
        BPETokenizer.from_hf(tmp_path)  # half a pair: tokenizer.json is read
    doc["normalizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.encoder == small_tok.encoder and tok.merges == small_tok.merges
    assert tok.special_tokens == small_tok.special_tokens


def _with(doc: dict, path: str, value) -> dict:
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return out


REFUSED = [
    ("model.type", "WordPiece", r"model\.type is 'WordPiece', not 'BPE'"),
    ("model.dropout", 0.1, r"model\.dropout is 0\.1"),
    ("model.continuing_subword_prefix", "##", r"model\.continuing_subword_prefix is '##'"),
    ("model.ignore_merges", True, r"model\.ignore_merges is true"),
    ("normalizer", {"type": "Lowercase"}, r"normalizer is 'Lowercase'"),
    (
        "pre_tokenizer",
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        r"pre_tokenizer is 'Metaspace', not 'ByteLevel'",
    ),
    ("pre_tokenizer.add_prefix_space", True, r"add_prefix_space true"),
    ("pre_tokenizer.use_regex", False, r"use_regex false"),
    ("added_tokens.0.lstrip", True, r"added token '<\|endoftext\|>' has lstrip set"),
]


@pytest.mark.parametrize("key,value,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refuses_other_kinds(small_tok, tmp_path, key, value, message):
    small_tok.export_hf(tmp_path / "ok")
    doc = json.loads((tmp_path / "ok" / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps(_with(doc, key, value)))
    with pytest.raises(
        ValueError,
        match=r"bad/tokenizer\.json: not a byte-level BPE tokenizer "
        r"of GPT-2's kind: .*" + message,
    ):
        BPETokenizer.from_hf(tmp_path / "bad")


def test_refuses_custom_pattern_and_real_other_models(tmp_path):
    # our own export of a tokenizer with another pattern: a Split before ByteLevel
    tok = BPETokenizer.train(
        ["abc 123 abcabc"] * 5, 270, pattern=r"\p{L}+|\p{N}|\s+", show_progress=False
    )
    tok.export_hf(tmp_path / "split")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "split" / name).unlink()
    with pytest.raises(
        ValueError, match=r"pre_tokenizer is a Sequence of \['Split', 'ByteLevel'\]"
    ):
        BPETokenizer.from_hf(tmp_path / "split")
    # a word-level tokenizer as `tokenizers` saves it
    from tokenizers import Tokenizer, models, pre_tokenizers

    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "word").mkdir()
    word.save(str(tmp_path / "word" / "tokenizer.json"))
    with pytest.raises(
        ValueError, match=r"model\.type is 'WordLevel'.*pre_tokenizer is 'Whitespace'"
    ):
        BPETokenizer.from_hf(tmp_path / "word")


def test_malformed_documents(small_tok, tmp_path):
    small_tok.export_hf(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink()
    path = tmp_path / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))

    def refused(document, match: str) -> None:
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        with pytest.raises(ValueError, match=match):
            BPETokenizer.from_hf(tmp_path)

    refused('{"model": ', r"tokenizer\.json: not valid JSON")
    refused(_with(doc, "model.merges.3", "a b c"), r"model\.merges\[3\]: expected \"left right\"")
    refused(
        _with(doc, "model.merges.0", ["Ġ", "zzzq"]),
        r"model\.merges\[0\]: token 'zzzq' is not in model\.vocab",
    )
    clash = _with(doc, "added_tokens.0.id", 3)
    del clash["model"]["vocab"][ENDOFTEXT]
    refused(clash, r"added token '<\|endoftext\|>' has id 3, which is")
    bad_vocab = copy.deepcopy(doc)
    del bad_vocab["model"]["vocab"]["Ġ"]
    refused(bad_vocab, r"must be exactly 0\.\.|byte 32")
    refused(_with(doc, "added_tokens.0.content", "a"), r"added token 'a' is also an ordinary")
    # an added token the model already holds keeps the model's id, as in `tokenizers`
    moved = _with(doc, "added_tokens.0.id", 3)
    assert moved["model"]["vocab"][ENDOFTEXT] == small_tok.eot_token != 3
    path.write_text(json.dumps(moved))
    assert BPETokenizer.from_hf(tmp_path).eot_token == small_tok.eot_token
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert hf.token_to_id(ENDOFTEXT) == small_tok.eot_token
