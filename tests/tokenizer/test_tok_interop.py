"""Interop and reference parity: HF tokenizers' trainer, export_hf, from_hf, tiktoken."""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handgrad.tokenizer import ENDOFTEXT, BPETokenizer
from handgrad.tokenizer.bytelevel import GPT2_PATTERN, bytes_to_unicode

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

HF_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Characters both sides classify alike: the `regex` package may know newer Unicode than
# tiktoken's / HF's regex engines, so unassigned (Cn, as of Python's unicodedata) and surrogate
# code points are left out of the parity property tests (they are covered by round-trip tests).
PARITY_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cn", "Co")), max_size=120
) | st.lists(
    st.sampled_from(["'s", "'ll", " ", "  ", "\n", "\t", "12", "345", "ab", "é", "😀", "!?", "\r"]),
    max_size=40,
).map("".join)


def hf_train(docs: list[str], vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(docs, trainer)
    return hf


def hf_merges_as_bytes(hf) -> list[tuple[bytes, bytes]]:
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    merges = json.loads(hf.to_str())["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return [(bytes(u2b[c] for c in a), bytes(u2b[c] for c in b)) for a, b in pairs]


def our_merges_as_bytes(tok: BPETokenizer) -> list[tuple[bytes, bytes]]:
    return [(tok.decoder[a], tok.decoder[b]) for a, b in tok.merges]


# ---------------------------------------------------------------- training parity


def tie_free_corpus(seed: int = 3) -> list[str]:
    """60 random words over 'abcde' with distinct random counts (seed 3: no ties in 40 merges)."""
    rng = random.Random(seed)
    words = {"".join(rng.choice("abcde") for _ in range(rng.randint(3, 8))) for _ in range(60)}
    counts = rng.sample(range(20, 2000), len(words))
    return [" ".join([w] * c) for w, c in zip(sorted(words), counts)]


def test_merges_equal_hf_trainer_without_ties():
    docs = tie_free_corpus()
    n_merges = 40
    ours = BPETokenizer.train(docs, 256 + n_merges + 1, show_progress=False)
    assert len(ours.merges) == n_merges
    # Check that the corpus really has no count tie, with a brute-force recount before each merge.
    words = Counter(tuple(w.encode()) for d in docs for w in regex.findall(GPT2_PATTERN, d))
    for rank, (a, b) in enumerate(ours.merges):
        counts: Counter[tuple[int, int]] = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                counts[p] += c
        (_, first), (_, second) = counts.most_common(2)
        assert first != second, f"corpus has a count tie at merge {rank}"
        assert counts[(a, b)] == first
        words = Counter({tuple(_merge(list(w), a, b, 256 + rank)): c for w, c in words.items()})
    hf = hf_train(docs, 256 + n_merges + 1, [ENDOFTEXT])
    assert our_merges_as_bytes(ours) == hf_merges_as_bytes(hf)


def _merge(word: list[int], a: int, b: int, new: int) -> list[int]:
    out, j = [], 0
    while j < len(word):
        if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
            out.append(new)
            j += 2
        else:
            out.append(word[j])
            j += 1
    return out


def test_merges_equal_hf_trainer_on_varied_corpus(corpus, varied_texts):
    # This corpus has count ties; our tie rule reproduces HF's, so the lists still agree.
    docs = corpus + varied_texts
    ours = BPETokenizer.train(docs, 800, show_progress=False)
    hf = hf_train(docs, 800, [ENDOFTEXT])
    assert len(ours.merges) == 800 - 257
    assert our_merges_as_bytes(ours) == hf_merges_as_bytes(hf)


def test_merges_equal_hf_trainer_on_shakespeare(shakespeare_docs):
    ours = BPETokenizer.train(shakespeare_docs, 1200, show_progress=False)
    hf = hf_train(shakespeare_docs, 1200, [ENDOFTEXT])
    assert our_merges_as_bytes(ours) == hf_merges_as_bytes(hf)


# ---------------------------------------------------------------- tiktoken


def test_tiktoken_parity_varied(small_tok, varied_texts):
    enc = small_tok.to_tiktoken()
    assert enc.n_vocab == small_tok.vocab_size
    for text in varied_texts:
        assert enc.encode_ordinary(text) == small_tok.encode_ordinary(text), repr(text)
        t = text + "<|endoftext|>" + text
        assert enc.encode(t, allowed_special="all") == small_tok.encode(t, allowed_special="all")


@settings(max_examples=200, **HF_SETTINGS)
@given(PARITY_TEXT)
def test_tiktoken_parity_property(small_tok, text):
    enc = _cached_tiktoken(small_tok)
    assert enc.encode_ordinary(text) == small_tok.encode_ordinary(text)


_TIKTOKEN_CACHE: dict[int, object] = {}


def _cached_tiktoken(tok):
    if id(tok) not in _TIKTOKEN_CACHE:
        _TIKTOKEN_CACHE[id(tok)] = tok.to_tiktoken()
    return _TIKTOKEN_CACHE[id(tok)]


def test_tiktoken_parity_larger_vocab(shakespeare_tok, varied_texts):
    enc = shakespeare_tok.to_tiktoken()
    for text in varied_texts:
        assert enc.encode_ordinary(text) == shakespeare_tok.encode_ordinary(text), repr(text)


# ---------------------------------------------------------------- export_hf


def test_export_hf_tokenizers_same_ids(small_tok, varied_texts, tmp_path):
    small_tok.export_hf(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer.json"}
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    # vocab.json + merges.txt through HF's own GPT-2 style loader, too
    from tokenizers import decoders, models, pre_tokenizers

    hf_files = tokenizers.Tokenizer(
        models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    )
    hf_files.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf_files.decoder = decoders.ByteLevel()
    for text in varied_texts:
        ids = small_tok.encode_ordinary(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert hf_files.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert hf.decode(ids) == text
    t = "a<|endoftext|>b"
    assert hf.encode(t).ids == small_tok.encode(t, allowed_special="all")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Ġ"] == 32 and vocab[ENDOFTEXT] == small_tok.eot_token  # our ids, unchanged


@settings(max_examples=150, **HF_SETTINGS)
@given(PARITY_TEXT)
def test_export_hf_parity_property(small_tok, hf_exported, text):
    assert hf_exported.encode(text, add_special_tokens=False).ids == small_tok.encode_ordinary(text)


@pytest.fixture(scope="module")
def hf_exported(small_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_export")
    small_tok.export_hf(d)
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


def test_export_hf_transformers(small_tok, varied_texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    small_tok.export_hf(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in varied_texts:
        if text.strip():
            assert hf(text)["input_ids"] == small_tok.encode_ordinary(text), repr(text)
    assert hf.convert_tokens_to_ids(ENDOFTEXT) == small_tok.eot_token


def test_export_hf_custom_pattern(tmp_path):
    pattern = r"\p{L}+|\p{N}|[^\p{L}\p{N}]+"  # digits one by one, spaces not glued to words
    tok = BPETokenizer.train(
        ["abc 123 abcabc  4567 de"] * 5, 280, pattern=pattern, show_progress=False
    )
    tok.export_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc 123", "x9y 88 abcabc", "  \n"]:
        assert hf.encode(text).ids == tok.encode(text)
        assert tok.to_tiktoken().encode_ordinary(text) == tok.encode(text)


# ---------------------------------------------------------------- from_hf


def test_from_hf_gpt2_layout(corpus, varied_texts, tmp_path):
    # HF's trainer without special tokens orders the 256 bytes exactly like OpenAI's GPT-2
    # vocab.json (by bytes_to_unicode character); append <|endoftext|> last as GPT-2 does.
    hf = hf_train(corpus, 700, [])
    hf.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    vocab[ENDOFTEXT] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")

    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.vocab_size == 701 and tok.eot_token == 700
    assert tok.encoder[b"!"] == 0 and tok.encoder[b" "] == 220  # as in OpenAI's GPT-2 files
    for text in varied_texts:
        assert tok.encode_ordinary(text) == hf.encode(text).ids, repr(text)
        assert tok.decode(tok.encode(text)) == text
    # save/load keeps the foreign id layout
    tok.save(tmp_path / "tok.json")
    again = BPETokenizer.load(tmp_path / "tok.json")
    assert again.encoder == tok.encoder and again.special_tokens == tok.special_tokens
    assert again.to_tiktoken().encode_ordinary(varied_texts[0]) == tok.encode(varied_texts[0])


def test_from_hf_special_tokens_first(corpus, varied_texts, tmp_path):
    hf = hf_train(corpus, 600, [ENDOFTEXT, "<pad>"])
    hf.model.save(str(tmp_path))
    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.special_tokens == {ENDOFTEXT: 0, "<pad>": 1}
    for text in varied_texts:
        assert tok.encode_ordinary(text) == hf.encode(text).ids, repr(text)


def test_from_hf_round_trips_our_export(small_tok, tmp_path):
    small_tok.export_hf(tmp_path)
    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.encoder == small_tok.encoder
    assert tok.merges == small_tok.merges
    assert tok.special_tokens == small_tok.special_tokens


def test_from_hf_errors(small_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        BPETokenizer.from_hf(tmp_path)
    small_tok.export_hf(tmp_path)
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nĠ zzzq\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:2: token 'zzzq' is not in vocab.json"):
        BPETokenizer.from_hf(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    del vocab["Ġ"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="ids must be exactly|byte 32"):
        BPETokenizer.from_hf(tmp_path)


def test_unicode_categories_cover_sample():
    # guard for PARITY_TEXT: Python knows these characters, so they are not filtered out
    assert unicodedata.category("é") == "Ll" and unicodedata.category("😀") == "So"


# ---------------------------------------------------------------- special tokens first


def test_export_keeps_special_tokens_first(corpus, varied_texts, tmp_path):
    # HF's BpeTrainer puts its special tokens first: <|endoftext|> = 0, <pad> = 1
    hf = hf_train(corpus, 600, [ENDOFTEXT, "<pad>"])
    hf.model.save(str(tmp_path))
    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.special_tokens == {ENDOFTEXT: 0, "<pad>": 1}
    out = tmp_path / "export"
    tok.export_hf(out)
    document = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert [(t["content"], t["id"], t["special"]) for t in document["added_tokens"]] == [
        (ENDOFTEXT, 0, True),
        ("<pad>", 1, True),
    ]
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8"))[ENDOFTEXT] == 0
    again = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert again.token_to_id(ENDOFTEXT) == 0 and again.token_to_id("<pad>") == 1
    assert again.get_vocab_size() == hf.get_vocab_size() == tok.vocab_size
    for text in [*varied_texts, f"a{ENDOFTEXT}b<pad>c", f"{ENDOFTEXT}{ENDOFTEXT}"]:
        assert again.encode(text).ids == hf.encode(text).ids, repr(text)
        assert tok.encode(text, allowed_special="all") == hf.encode(text).ids, repr(text)
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast.from_pretrained(str(out))
    text = f"the end{ENDOFTEXT} and <pad> more"
    assert fast(text)["input_ids"] == hf.encode(text).ids
    assert fast.convert_tokens_to_ids(ENDOFTEXT) == 0
    # the exported files read back to the same tokenizer
    back = BPETokenizer.from_hf(out)
    assert back.encoder == tok.encoder and back.special_tokens == tok.special_tokens


# ---------------------------------------------------------------- OpenAI's file names


def write_openai_files(directory, docs: list[str], vocab_size: int) -> object:
    """encoder.json + vocab.bpe as OpenAI released GPT-2's tokenizer (vocab.bpe opens with a
    "#version" line and ends with a newline; <|endoftext|> is the last id). Returns the HF
    tokenizer the files come from."""
    hf = hf_train(docs, vocab_size, [])
    hf.model.save(str(directory))
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    vocab[ENDOFTEXT] = len(vocab)
    (directory / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").rename(directory / "vocab.bpe")
    (directory / "vocab.json").unlink()
    return hf


def test_from_hf_openai_file_names(corpus, varied_texts, tmp_path, monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from handgrad.tokenizer import load_tokenizer

    hf = write_openai_files(tmp_path, corpus, 700)
    assert (tmp_path / "vocab.bpe").read_text(encoding="utf-8").startswith("#version")
    tok = BPETokenizer.from_hf(tmp_path)
    assert tok.vocab_size == 701 and tok.eot_token == 700
    # tiktoken's own reader of OpenAI's GPT-2 files (no cache: TIKTOKEN_CACHE_DIR="")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json")
    )
    enc = tiktoken.Encoding(
        name="openai-files",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 700},
    )
    assert ranks == tok.encoder
    for text in varied_texts:
        ids = tok.encode(text + ENDOFTEXT, allowed_special="all")
        assert ids == enc.encode(text + ENDOFTEXT, allowed_special="all"), repr(text)
        assert tok.encode_ordinary(text) == hf.encode(text).ids, repr(text)
    for path in (tmp_path, tmp_path / "encoder.json", tmp_path / "vocab.bpe"):
        assert load_tokenizer(path).encoder == tok.encoder


def test_from_hf_missing_files_name_both_layouts(small_tok, tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"looked for vocab\.json \+ merges\.txt or encoder\.json \+ vocab\.bpe",
    ):
        BPETokenizer.from_hf(tmp_path)
    small_tok.export_hf(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # read when no pair is complete
    (tmp_path / "vocab.json").rename(tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match="found only merges.txt, encoder.json"):
        BPETokenizer.from_hf(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ zzzq\n", encoding="utf-8")
    (tmp_path / "merges.txt").rename(tmp_path / "vocab.bpe")
    with pytest.raises(ValueError, match=r"vocab.bpe:2: token 'zzzq' is not in encoder.json"):
        BPETokenizer.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        BPETokenizer.from_hf(tmp_path / "nowhere")
