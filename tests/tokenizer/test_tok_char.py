"""CharTokenizer (nanoGPT's shakespeare_char)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handgrad.tokenizer import CharTokenizer, load_tokenizer


def test_vocab_is_sorted_unique_chars():
    tok = CharTokenizer.train("hello world\n")
    assert tok.chars == ["\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == tok.n_vocab == 9
    assert tok.eot_token is None and tok.special_tokens == {}
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.decode([4, 3, 5, 5, 6]) == "hello"


def test_train_on_several_texts():
    assert CharTokenizer.train(["ab", "ca"]).chars == ["a", "b", "c"]


def test_shakespeare_has_65_chars(shakespeare_docs):
    tok = CharTokenizer.train(shakespeare_docs)
    # the first 300 kB already holds most of nanoGPT's 65 characters
    assert 55 <= tok.vocab_size <= 65
    text = "\n\n".join(shakespeare_docs[:50])
    assert tok.decode(tok.encode(text)) == text


@given(st.text(max_size=100))
def test_round_trip(text):
    tok = CharTokenizer.train(text + "x")
    assert tok.decode(tok.encode(text)) == text


def test_unknown_char_is_named():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\) at position 2"):
        tok.encode("abz")


@pytest.mark.parametrize("bad", [3, -1, 2.0])
def test_unknown_id(bad):
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match="unknown token id .* at position 1"):
        tok.decode([0, bad])


def test_encode_batch_and_save(tmp_path):
    tok = CharTokenizer.train("abc\u00e9\U0001f600")
    texts = ["abc", "\U0001f600\u00e9", ""]
    assert tok.encode_batch(texts, workers=2) == [tok.encode(t) for t in texts]
    tok.save(tmp_path / "c.json")
    again = load_tokenizer(tmp_path / "c.json")
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars
    assert CharTokenizer.load(tmp_path / "c.json").encode("cab") == [2, 0, 1]
