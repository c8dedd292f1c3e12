"""BPETokenizer: training, vocabulary layout, encode/decode, special tokens, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handgrad.tokenizer.bpe as bpe
import handgrad.tokenizer.bpe_train as bpe_train
import handgrad.tokenizer.pretokenize as pretokenize
from handgrad.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer
from handgrad.tokenizer.bytelevel import fix_surrogates

# ---------------------------------------------------------------- training


def test_train_hand_computed_merges():
    # Pre-tokens: "ab", " ab" x2, " cd" x2.  Pair counts: (a,b)=3, ( ,a)=2, ( ,c)=2, (c,d)=2.
    # 1) (a,b)=3 -> 256.  Then ( ,256)=2, ( ,c)=2, (c,d)=2 tie; HF's keys: 'c','d' are printable
    # (keys 66, 67) while ' ' maps to U+0120 (key 220), so (c,d) -> 257 wins, then ( ,256) -> 258
    # (256 < 257), then ( ,257) -> 259.
    tok = BPETokenizer.train(["ab ab ab cd cd"], 256 + 4 + 1, show_progress=False)
    assert tok.merges == [(97, 98), (99, 100), (32, 256), (32, 257)]
    assert tok.decoder[258] == b" ab" and tok.decoder[259] == b" cd"
    assert tok.special_tokens == {ENDOFTEXT: 260}
    assert tok.eot_token == 260 and tok.vocab_size == tok.n_vocab == 261
    assert tok.encode("ab cd ab") == [256, 259, 258]


def test_vocab_layout(small_tok):
    assert small_tok.vocab_size == 600
    for b in range(256):
        assert small_tok.decoder[b] == bytes([b])
    merges = small_tok.merges
    assert len(merges) == 600 - 256 - 1
    for rank, (a, b) in enumerate(merges):
        # merge i makes token 256 + i out of two earlier tokens
        assert a < 256 + rank and b < 256 + rank
        assert small_tok.decoder[256 + rank] == small_tok.decoder[a] + small_tok.decoder[b]
    assert small_tok.eot_token == 599
    assert small_tok.special_tokens == {ENDOFTEXT: 599}


def test_train_is_deterministic_and_order_free(corpus):
    a = BPETokenizer.train(corpus, 400, show_progress=False)
    b = BPETokenizer.train(list(reversed(corpus)), 400, show_progress=False)
    assert a.merges == b.merges


def test_train_counts_each_merge_greedily(make_corpus):
    # Brute force reference: recount all pairs from scratch after each merge.
    docs = make_corpus(seed=3, n_docs=40)
    tok = BPETokenizer.train(docs, 256 + 30, special_tokens=(), show_progress=False)
    words = [list(w.encode()) for d in docs for w in regex.findall(GPT2_PATTERN, d)]
    for rank, (a, b) in enumerate(tok.merges):
        counts: dict[tuple[int, int], int] = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        assert counts[(a, b)] == max(counts.values()), f"merge {rank} is not a most frequent pair"
        new = 256 + rank
        for k, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[k] = out


def _reference_merges(word_counts, n_merges):
    """learn_merges spelt out: recount every pair after each merge; ties by HF's keys."""
    words = [(list(w), c) for w, c in word_counts.items()]
    token_bytes = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(token_bytes)}
    key = bpe_train._hf_byte_keys()
    merges = []
    while len(merges) < n_merges:
        counts: dict[tuple[int, int], int] = {}
        for w, c in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + c
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], key[p[0]], key[p[1]]))
        new = ids.get(token_bytes[a] + token_bytes[b])
        if new is None:
            new = ids[token_bytes[a] + token_bytes[b]] = len(token_bytes)
            token_bytes.append(token_bytes[a] + token_bytes[b])
            key.append(new)
            merges.append((a, b))
        for w, _ in words:
            j = 0
            while j + 1 < len(w):
                if w[j] == a and w[j + 1] == b:
                    w[j : j + 2] = [new]
                j += 1
    return token_bytes, merges


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.lists(st.sampled_from(b"ab c"), min_size=1, max_size=12).map(bytes),
        st.integers(1, 5),
        max_size=12,
    )
)
def test_learn_merges_equals_recounting(word_counts):
    # repeats (aaaa, abab), a == b, pairs that leave and come back: the incremental updates agree
    assert bpe_train.learn_merges(word_counts, 40, False) == _reference_merges(word_counts, 40)


def test_train_from_files_matches_documents(tmp_path, monkeypatch, corpus):
    # Tiny read chunks force many chunk boundaries inside words, whitespace runs and specials.
    monkeypatch.setattr(bpe_train, "TRAIN_CHUNK_CHARS", 7)
    text = "".join(corpus[:60]) + "we'll they've\n\n\n   x<|endoftext|>y  \n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    from_file = BPETokenizer.train([path], 350, show_progress=False)
    from_doc = BPETokenizer.train([text], 350, show_progress=False)
    assert from_file.merges == from_doc.merges
    counted_file = bpe_train.count_words([path], regex.compile(GPT2_PATTERN), (ENDOFTEXT,))
    counted_doc = bpe_train.count_words([text], regex.compile(GPT2_PATTERN), (ENDOFTEXT,))
    assert counted_file == counted_doc
    assert b"<|" not in counted_doc and b"endoftext" not in counted_doc


def test_train_special_tokens_are_boundaries():
    counts = bpe_train.count_words(["ab<|endoftext|>ab"], regex.compile(GPT2_PATTERN), (ENDOFTEXT,))
    assert counts == {b"ab": 2}


def test_train_stops_early_when_nothing_left_to_merge():
    tok = BPETokenizer.train(["abc abc"], 1000, show_progress=False)
    # pairs available: (a,b), (b,c), ( ,a) ... finite; far fewer than 743 merges
    assert tok.vocab_size < 1000
    assert tok.eot_token == tok.vocab_size - 1
    assert tok.encode(" abc") == [tok.vocab_size - 2]


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="below 256"):
        BPETokenizer.train(["x"], 200)
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.train(["x"], 300, special_tokens=("<a>", "<a>"))
    with pytest.raises(ValueError, match="does not match every character"):
        BPETokenizer.train(["abc def"], 300, pattern=r"\w+")
    with pytest.raises(TypeError, match="PathLike"):
        BPETokenizer.train([123], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        BPETokenizer.train([bad], 300)


# ---------------------------------------------------------------- encode / decode


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_any_unicode(small_tok, text):
    assert small_tok.decode(small_tok.encode_ordinary(text)) == text


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.sampled_from(["😀", "\u0301", "\x00", "e", " ", "\n", "'s", "日", "\u200d"]), max_size=50
    ).map("".join)
)
def test_round_trip_emoji_combining_nul(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


def test_round_trip_varied(small_tok, varied_texts):
    for text in varied_texts:
        ids = small_tok.encode(text)
        assert small_tok.decode(ids) == text
        assert small_tok.decode_bytes(ids) == text.encode("utf-8")


def test_lone_surrogates_become_replacement_char(small_tok):
    # Rule (as tiktoken): lone surrogates -> U+FFFD; a high+low pair -> the character it encodes.
    assert small_tok.decode(small_tok.encode("a\ud800b")) == "a\ufffdb"
    assert small_tok.decode(small_tok.encode("x \udfff")) == "x \ufffd"
    assert small_tok.decode(small_tok.encode("\ud83d\ude00!")) == "😀!"
    assert small_tok.encode("a\ud800b") == small_tok.encode("a\ufffdb")
    assert fix_surrogates("ok\udc00") == "ok\ufffd"


def test_word_cache_gives_same_ids(small_tok, varied_texts):
    fresh = BPETokenizer.from_dict(small_tok.to_dict())
    text = " ".join(varied_texts)
    first = fresh.encode(text)
    assert fresh._cache  # the cache was filled ...
    assert fresh.encode(text) == first  # ... and reused with the same result
    # and equals the uncached merge loop applied word by word
    direct = [i for w in fresh._pat.findall(text) for i in fresh._bpe(w.encode())]
    assert first == direct


_SPLIT_PIECES = [
    "a", "Zs", "'s", "'ll", "it's", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x1c", "\x00", "7",
    ".", "!?", "-", "\x7f", "é", "中文", "²", "\u2019", "\xa0", "\u3000", "\x85", "\u2028", "😀",
    "ß", "٣",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_SPLIT_PIECES), max_size=80).map("".join) | st.text(max_size=80))
def test_split_gpt2_equals_the_regex(text):
    # the ASCII fast path (stdlib re between pre-token boundaries) splits exactly like `regex`
    pat = regex.compile(GPT2_PATTERN)
    assert pretokenize.split_gpt2(pat, text) == pat.findall(text)


def test_split_gpt2_long_texts(monkeypatch):
    pat = regex.compile(GPT2_PATTERN)
    rng = __import__("random").Random(0)
    for block in (7, 4096):
        monkeypatch.setattr(pretokenize, "_ASCII_BLOCK", block)  # runs across blocks, many blocks
        for share in (0.001, 0.05, 0.5):  # sparse non-ASCII, then dense (the `regex` fallback)
            words = [
                rng.choice(_SPLIT_PIECES) if rng.random() < share else rng.choice(["ab", "x1"])
                for _ in range(3000)
            ]
            text = " ".join(words)
            assert pretokenize.split_gpt2(pat, text) == pat.findall(text)


def test_cache_is_bounded(monkeypatch, small_tok):
    fresh = BPETokenizer.from_dict(small_tok.to_dict())
    monkeypatch.setattr(bpe, "WORD_CACHE_SIZE", 10)
    for k in range(50):
        fresh.encode(f" w{k} x{k} y{k}")
    assert len(fresh._cache) <= 10 + 6


def test_decode_invalid_utf8_is_replaced(small_tok):
    ids = small_tok.encode("é")  # two bytes, maybe one token
    lone = [0xC3]  # first byte of "é" alone
    assert small_tok.decode(lone) == "\ufffd"
    assert small_tok.decode_bytes(lone) == b"\xc3"
    assert small_tok.decode(ids) == "é"


@pytest.mark.parametrize("bad", [600, -1, 10**9])
def test_decode_unknown_id(small_tok, bad):
    with pytest.raises(ValueError, match=rf"unknown token id {bad} at position 1"):
        small_tok.decode([5, bad])


def test_decode_accepts_numpy_ints(small_tok):
    np = pytest.importorskip("numpy")
    ids = small_tok.encode("hello there")
    assert small_tok.decode(np.array(ids, dtype=np.int64)) == "hello there"


# ---------------------------------------------------------------- special tokens


def test_special_tokens_refused_by_default(small_tok):
    with pytest.raises(ValueError, match=r"'<\|endoftext\|>' at character 4"):
        small_tok.encode("abc <|endoftext|> def")


def test_special_tokens_allowed(small_tok):
    eot = small_tok.eot_token
    text = "abc<|endoftext|> def<|endoftext|>"
    ids = small_tok.encode(text, allowed_special="all")
    assert ids == small_tok.encode("abc") + [eot] + small_tok.encode(" def") + [eot]
    assert small_tok.encode(text, allowed_special={ENDOFTEXT}) == ids
    assert small_tok.decode(ids) == text


def test_special_tokens_as_ordinary_text(small_tok):
    text = "x<|endoftext|>"
    ids = small_tok.encode(text, disallowed_special=())
    assert small_tok.eot_token not in ids
    assert ids == small_tok.encode_ordinary(text)
    assert small_tok.decode(ids) == text


def test_unknown_special_name_is_an_error(small_tok):
    with pytest.raises(ValueError, match="not special tokens"):
        small_tok.encode("x", allowed_special={"<|nope|>"})


def test_several_special_tokens():
    tok = BPETokenizer.train(
        ["hello world"], 262, special_tokens=("<|a|>", "<|a|>x", "<|b|>"), show_progress=False
    )
    assert tok.special_tokens == {"<|a|>": 259, "<|a|>x": 260, "<|b|>": 261}
    assert tok.eot_token is None
    # the longest special token wins; <|b|> stays disallowed
    assert tok.encode("<|a|>x", allowed_special={"<|a|>", "<|a|>x"}) == [260]
    with pytest.raises(ValueError, match=r"<\|b\|>"):
        tok.encode("<|a|><|b|>", allowed_special={"<|a|>"})


# ---------------------------------------------------------------- batch


def test_encode_batch_inline_and_pool(small_tok, varied_texts):
    texts = varied_texts + ["x<|endoftext|>y"] * 3
    expected = [small_tok.encode(t, allowed_special="all") for t in texts]
    assert small_tok.encode_batch(texts, workers=1, allowed_special="all") == expected
    assert small_tok.encode_batch(texts, workers=2, allowed_special="all") == expected
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        small_tok.encode_batch(texts, workers=1)
    with pytest.raises(ValueError, match="workers"):
        small_tok.encode_batch(texts, workers=0)


def test_constructor_validates():
    enc = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="single-byte"):
        BPETokenizer({b"a": 0}, [])
    with pytest.raises(ValueError, match="not in the encoder"):
        BPETokenizer(enc, [(97, 98)])
    with pytest.raises(ValueError, match="exactly 0..256"):
        BPETokenizer(enc, [], {"<s>": 300})


def test_repr_mentions_sizes(small_tok):
    assert "vocab_size=600" in repr(small_tok)


def test_train_on_path_single_item(tmp_path):
    p = Path(tmp_path / "one.txt")
    p.write_text("hello hello hello", encoding="utf-8")
    tok = BPETokenizer.train(p, 260, special_tokens=(), show_progress=False)
    assert tok.decoder[256] in (b"he", b"ll", b"el", b"lo")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(["a", "b", "ab", " ", "é", "kato", "1"]), max_size=60).map("".join))
def test_heap_merge_equals_linear_scan(small_tok, text):
    piece = text.encode("utf-8")
    if not piece:
        return
    saved = bpe.LONG_PIECE
    try:
        bpe.LONG_PIECE = 10**9  # always the linear scan
        linear = small_tok._bpe(piece)
        bpe.LONG_PIECE = 0  # always the heap
        heap = small_tok._bpe(piece)
    finally:
        bpe.LONG_PIECE = saved
    assert heap == linear
    assert small_tok.decode(heap) == text


def test_long_pieces_are_fast_and_round_trip(small_tok):
    # 200k spaces / letters / digits: O(n^2) merging would take minutes
    for text in (" " * 200_000 + "x", "ka" * 100_000, "7" * 100_001):
        fresh = BPETokenizer.from_dict(small_tok.to_dict())
        assert fresh.decode(fresh.encode(text)) == text


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(max_size=60)
    | st.lists(
        st.sampled_from(["a", "\ud800", "\udc00", "\ud83d", "\ude00", " "]), max_size=20
    ).map("".join)
)
def test_surrogate_rule_property(small_tok, text):
    # the documented rule, spelled out independently of the code: UTF-16 with surrogatepass,
    # decoded back with 'replace' (pairs join, lone surrogates become U+FFFD)
    expected = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    assert small_tok.decode(small_tok.encode(text)) == expected


def test_train_says_when_a_file_name_is_taken_as_text_or_the_vocabulary_is_short(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("hello world " * 50, encoding="utf-8")
    with pytest.warns(UserWarning, match="'corpus.txt' is learnt from as text.*pathlib.Path"):
        BPETokenizer.train(["corpus.txt"], vocab_size=260)
    with pytest.warns(UserWarning, match=r"the vocabulary is \d+ tokens, not the 1000 asked for"):
        tok = BPETokenizer.train([Path("corpus.txt")], vocab_size=1000)
    assert tok.vocab_size < 1000
