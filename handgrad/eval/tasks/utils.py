"""Helpers the task YAMLs in this directory name with ``!function utils.<name>``.

Perplexity tasks ("loglikelihood_rolling") are normalised to documents ``{"page": text}``,
where ``page`` is the text as the dataset has it. The model scores ``doc_to_target(doc)``
(the page, detokenized for the word-level corpora, as the GPT-2 paper did), while the
denominators always count the original page, as lm-eval's own wikitext task does: words are
``len(re.split(r"\\s+", page))`` and bytes are ``len(page.encode("utf-8"))``. So

    word_perplexity = exp(-sum(log-likelihood) / sum(words))
    byte_perplexity = exp(-sum(log-likelihood) / sum(bytes))
    bits_per_byte   = -sum(log-likelihood) / sum(bytes) / ln 2

with the sums over documents (lm-eval's weighted_perplexity / bits_per_byte aggregations).
"""

from __future__ import annotations

import re
from typing import Any

# The wikitext detokenizer is lm-eval's own (its wikitext task), reused rather than re-typed.
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401

ENWIK8_TEST_BYTES = 5_000_000  # the standard split: 90M train, 5M valid, the last 5M test
ENWIK8_TOTAL_BYTES = 100_000_000


def rolling_results(doc: dict[str, Any], results: tuple[float]) -> dict[str, tuple[float, int]]:
    """(log-likelihood of the page, its words or bytes) for the weighted aggregations."""
    (loglikelihood,) = results
    page = doc["page"]
    words = len(re.split(r"\s+", page))
    n_bytes = len(page.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def rolling_results_bytes(
    doc: dict[str, Any], results: tuple[float]
) -> dict[str, tuple[float, int]]:
    """As ``rolling_results`` for the character-level corpora, which report no words."""
    out = rolling_results(doc, results)
    del out["word_perplexity"]
    return out


def _one_page(dataset: Any, field: str, separator: str) -> Any:
    """The whole split as a single document: the corpus is one stream (the GPT-2 paper scores
    it with as much context as the model holds), so rows are not separate documents."""
    import datasets

    text = separator.join(dataset[field])
    return datasets.Dataset.from_dict({"page": [text]})


# ---- Penn Treebank (ptb_text_only: one tokenized, lower-cased sentence per row)


def ptb_docs(dataset: Any) -> Any:
    return _one_page(dataset, "sentence", "\n")


def ptb_detokenizer(doc: dict[str, Any]) -> str:
    """Undo the PTB tokenization that text on the web does not have: spaces before
    punctuation and clitics. ``<unk>`` and ``N`` (numbers) are left as the corpus has them."""
    return detokenize(doc["page"])


# ---- One Billion Word (lm1b: one tokenized sentence per row, sentences shuffled)


def lm1b_docs(dataset: Any) -> Any:
    """Each sentence is its own document: the benchmark's sentences are shuffled, so there
    is no context to carry over."""
    import datasets

    return datasets.Dataset.from_dict({"page": list(dataset["text"])})


def lm1b_detokenizer(doc: dict[str, Any]) -> str:
    return detokenize(doc["page"])


def detokenize(text: str) -> str:
    """Reverse the common Penn-Treebank-style tokenization of PTB and 1BW."""
    for clitic in ("'s", "'re", "'ve", "'ll", "'d", "'m", "n't"):
        text = text.replace(f" {clitic}", clitic)
    text = re.sub(r" ([.,;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    return text.replace("`` ", '"').replace(" ''", '"')


# ---- enwik8 (LTCB/enwik8: the 100M-byte file, one line per row) and text8


def enwik8_docs(dataset: Any) -> Any:
    """One document: the last 5,000,000 bytes of enwik8 (its standard test split), starting at
    the first whole UTF-8 character. A local copy shorter than the full file is taken whole
    (it is already the test text)."""
    import datasets

    text = "\n".join(dataset["text"])
    data = text.encode("utf-8")
    if len(data) >= ENWIK8_TOTAL_BYTES - 1:
        tail = data[-ENWIK8_TEST_BYTES:]
        while tail and 0x80 <= tail[0] < 0xC0:  # a UTF-8 continuation byte
            tail = tail[1:]
        text = tail.decode("utf-8")
    return datasets.Dataset.from_dict({"page": [text]})


def text8_docs(dataset: Any) -> Any:
    return _one_page(dataset, "text", "")


# ---- Children's Book Test (cbt CN / NE): 20 sentences, then a 21st with one word removed


def _split_question(doc: dict[str, Any]) -> tuple[str, str]:
    before, marker, after = doc["question"].partition("XXXXX")
    if not marker:
        raise ValueError(f"CBT question without the XXXXX blank: {doc['question']!r}")
    return before, after


def cbt_context(doc: dict[str, Any]) -> str:
    """The 20 context sentences and the question up to the blank. A space before the blank
    stays at the end here; lm-eval moves it to the front of the continuation."""
    before, _ = _split_question(doc)
    return " ".join(s.strip() for s in doc["sentences"]) + " " + before


def cbt_choices(doc: dict[str, Any]) -> list[str]:
    """Each of the 10 candidates filled into the blank, followed by the rest of the sentence:
    the score is log P(candidate + rest | context), as in the GPT-2 paper ("the probability of
    each choice and the rest of the sentence conditioned on this choice")."""
    _, after = _split_question(doc)
    return [option + after for option in doc["options"]]


def cbt_target(doc: dict[str, Any]) -> int:
    options = list(doc["options"])
    if doc["answer"] not in options:
        raise ValueError(f"CBT answer {doc['answer']!r} is not among the options {options}")
    return options.index(doc["answer"])
