"""`handgrad tokenizer ...` sub-commands, driven through register() on a fresh parser."""

from __future__ import annotations

import argparse
import io
import sys

import pytest

from handgrad.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from handgrad.tokenizer.cli import register


def run(argv: list[str], monkeypatch, stdin: str = "") -> int:
    parser = argparse.ArgumentParser(prog="handgrad")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return args.func(args)


@pytest.fixture
def corpus_file(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(corpus), encoding="utf-8")
    return path


def test_train_encode_decode(tmp_path, corpus_file, monkeypatch, capsys):
    out = tmp_path / "tok.json"
    assert (
        run(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus_file),
                "--vocab-size",
                "300",
                "--out",
                str(out),
            ],
            monkeypatch,
        )
        == 0
    )
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300 and tok.eot_token == 299
    expected = BPETokenizer.train(
        [corpus_file.read_text(encoding="utf-8")], 300, show_progress=False
    )
    assert tok.merges == expected.merges
    capsys.readouterr()

    assert (
        run(["tokenizer", "encode", "--tokenizer", str(out), "--text", "hello kato"], monkeypatch)
        == 0
    )
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("hello kato")

    assert (
        run(["tokenizer", "encode", "--tokenizer", str(out)], monkeypatch, stdin="from stdin\n")
        == 0
    )
    assert capsys.readouterr().out.split() == [str(i) for i in tok.encode("from stdin\n")]

    assert run(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)], monkeypatch) == 0
    assert capsys.readouterr().out == "hello kato"
    assert (
        run(
            ["tokenizer", "decode", "--tokenizer", str(out)],
            monkeypatch,
            stdin=" ".join(map(str, ids)),
        )
        == 0
    )
    assert capsys.readouterr().out == "hello kato"


def test_special_tokens_flags(tmp_path, corpus_file, monkeypatch, capsys):
    out = tmp_path / "tok.json"
    assert (
        run(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus_file),
                "--vocab-size",
                "262",
                "--special",
                "<|endoftext|>",
                "<pad>",
                "--out",
                str(out),
            ],
            monkeypatch,
        )
        == 0
    )
    assert load_tokenizer(out).special_tokens == {"<|endoftext|>": 260, "<pad>": 261}
    capsys.readouterr()
    assert (
        run(["tokenizer", "encode", "--tokenizer", str(out), "--text", "a<pad>"], monkeypatch) == 2
    )
    assert "<pad>" in capsys.readouterr().err
    assert (
        run(
            ["tokenizer", "encode", "--tokenizer", str(out), "--text", "a<pad>", "--allow-special"],
            monkeypatch,
        )
        == 0
    )
    assert capsys.readouterr().out.split()[-1] == "261"


def test_char_train(tmp_path, monkeypatch):
    src = tmp_path / "s.txt"
    src.write_text("to be or not", encoding="utf-8")
    out = tmp_path / "char.json"
    assert (
        run(
            ["tokenizer", "train", "--type", "char", "--input", str(src), "--out", str(out)],
            monkeypatch,
        )
        == 0
    )
    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set("to be or not"))


def test_errors(tmp_path, corpus_file, monkeypatch, capsys):
    assert (
        run(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "missing.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "t.json"),
            ],
            monkeypatch,
        )
        == 2
    )
    assert (
        "handgrad tokenizer: error: " in (err := capsys.readouterr().err)
        and "missing.txt: no such file" in err
    )
    assert (
        run(
            ["tokenizer", "train", "--input", str(corpus_file), "--out", str(tmp_path / "t.json")],
            monkeypatch,
        )
        == 2
    )
    assert "--vocab-size is required" in capsys.readouterr().err
    BPETokenizer.train(["abc"], 258, show_progress=False).save(tmp_path / "t.json")
    assert (
        run(["tokenizer", "decode", "--tokenizer", str(tmp_path / "t.json"), "1", "x"], monkeypatch)
        == 2
    )
    assert "token id #1 is not an integer: 'x'" in capsys.readouterr().err
    assert (
        run(["tokenizer", "decode", "--tokenizer", str(tmp_path / "t.json"), "999"], monkeypatch)
        == 2
    )
    assert "unknown token id 999" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    assert (
        run(
            ["tokenizer", "encode", "--tokenizer", str(tmp_path / "bad.json"), "--text", "x"],
            monkeypatch,
        )
        == 2
    )
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_encode_with_gpt2_files(tmp_path, small_tok, monkeypatch, capsys):
    # OpenAI's names for GPT-2's files: encoder.json (= vocab.json) + vocab.bpe (= merges.txt)
    gpt2 = tmp_path / "gpt2"
    small_tok.export_hf(gpt2)
    (gpt2 / "tokenizer.json").unlink()
    (gpt2 / "vocab.json").rename(gpt2 / "encoder.json")
    (gpt2 / "merges.txt").rename(gpt2 / "vocab.bpe")
    text = "hello world<|endoftext|>again"
    expected = small_tok.encode(text, allowed_special="all")
    for where in (gpt2, gpt2 / "encoder.json"):
        argv = ["tokenizer", "encode", "--tokenizer", str(where), "--text", text]
        assert run([*argv, "--allow-special"], monkeypatch) == 0
        assert capsys.readouterr().out.split() == [str(i) for i in expected]
    argv = ["tokenizer", "decode", "--tokenizer", str(gpt2), *map(str, expected)]
    assert run(argv, monkeypatch) == 0
    assert capsys.readouterr().out == text
    (gpt2 / "vocab.bpe").unlink()
    argv = ["tokenizer", "encode", "--tokenizer", str(gpt2), "--text", "x"]
    assert run(argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "vocab.json + merges.txt or encoder.json + vocab.bpe" in err and "Traceback" not in err
