"""Chat data for supervised fine-tuning: ``handgrad data prepare --format chat``.

Input: ``.jsonl`` files of conversations in the messages format of the Hugging Face chat
datasets (no_robots, ultrachat, ...), one per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Roles are ``system``, ``user`` and ``assistant``. Each conversation becomes text in the
ChatML template, with two special tokens added to the tokenizer after its last id::

    <|endoftext|>                                       between conversations (if the
                                                        tokenizer has it)
    <|im_start|>system\\n{content}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n        trained: {content}<|im_end|>

Output: the usual token shards plus a loss mask per split (``train.mask.bin``, one byte per
token): 1 where the token is a target the model learns to predict, which is only the
content of assistant turns and the ``<|im_end|>`` that closes them (so the model learns to
stop), 0 everywhere else. A batch's targets are -1 where the mask is 0, which
``F.cross_entropy(..., ignore_index=-1)`` leaves out of the loss and of the gradient.

The tokenizer grows by the two special tokens; a model fine-tuned on the data grows its
embedding to match (``train/finetune.py``). The last ``val_fraction`` of the conversations
(at least one) is the validation split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from handgrad.data.prepare import FORMAT_VERSION, META_FILE, SPLITS, TOKENIZER_FILE, token_dtype
from handgrad.fileio import atomic_dir
from handgrad.manifest import hash_file

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

__all__ = ["IM_END", "IM_START", "chat_tokenizer", "encode_conversation", "prepare_chat"]


def chat_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` (a byte-level BPE) with ``<|im_start|>`` and ``<|im_end|>`` added after
    its last id (the tokenizer itself when it has them already)."""
    from handgrad.tokenizer import BPETokenizer

    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(
            f"--format chat needs a byte-level BPE tokenizer (special tokens mark the turns), "
            f"not a {type(tokenizer).__name__}"
        )
    doc = tokenizer.to_dict()
    for name in (IM_START, IM_END):
        if name not in doc["special_tokens"]:
            doc["special_tokens"][name] = doc["vocab_size"]
            doc["vocab_size"] += 1
    return BPETokenizer.from_dict(doc, source="chat tokenizer")


def encode_conversation(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The ids of one conversation in the template above, and its loss mask (1: trained)."""
    start, end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    newline = tok.encode_ordinary("\n")
    ids: list[int] = [] if tok.eot_token is None else [tok.eot_token]
    mask: list[int] = [0] * len(ids)
    for m in messages:
        header = [start, *tok.encode_ordinary(m["role"] + "\n")]
        body = [*tok.encode_ordinary(m["content"]), end]
        trained = 1 if m["role"] == "assistant" else 0
        ids += header + body + newline
        mask += [0] * len(header) + [trained] * len(body) + [0] * len(newline)
    return ids, mask


def _conversations(path: Path) -> list[list[dict[str, str]]]:
    """Every conversation of a .jsonl file, checked; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(
                    f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}]}}'
                )
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise ValueError(
                        f"{where}: message {i}: role must be one of {', '.join(ROLES)}, got "
                        f"{m.get('role') if isinstance(m, dict) else m!r}"
                    )
                if not isinstance(m.get("content"), str):
                    raise ValueError(f"{where}: message {i}: content must be a string")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: no assistant message: nothing to train on")
            out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


def prepare_chat(
    sources: list[str | os.PathLike],
    tokenizer: Any,
    out: str | os.PathLike,
    val_fraction: float = 0.1,
) -> dict[str, Any]:
    """Tokenize the conversations of ``sources`` (.jsonl files) with ``tokenizer`` plus the
    chat tokens into the prepared directory ``out`` (published whole, atomically); returns
    its meta.json."""
    files = [Path(s) for s in sources]
    for f in files:
        if f.suffix != ".jsonl" or not f.is_file():
            raise ValueError(f'{f}: --format chat reads .jsonl files of {{"messages": [...]}}')
    conversations = [c for f in files for c in _conversations(f)]
    if not conversations:
        raise ValueError(f"{', '.join(map(str, files))}: no conversations")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction}: must be in [0, 1)")
    n_val = 0 if val_fraction == 0 else max(1, round(len(conversations) * val_fraction))
    if n_val >= len(conversations):
        raise ValueError(
            f"{len(conversations)} conversation(s) leave none to train on with val_fraction = "
            f"{val_fraction}"
        )
    tok = chat_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    parts = {"train": conversations[: len(conversations) - n_val],
             "val": conversations[len(conversations) - n_val :]}  # fmt: skip
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok.save(tmp / TOKENIZER_FILE)
        splits = {}
        for split in SPLITS:
            ids: list[int] = []
            mask: list[int] = []
            for messages in parts[split]:
                i, m = encode_conversation(tok, messages)
                ids += i
                mask += m
            (tmp / f"{split}.bin").write_bytes(np.asarray(ids, dtype=dtype).tobytes())
            (tmp / f"{split}.mask.bin").write_bytes(np.asarray(mask, dtype=np.uint8).tobytes())
            splits[split] = {
                "file": f"{split}.bin", "tokens": len(ids), "documents": len(parts[split]),
                "sha256": hash_file(tmp / f"{split}.bin", "sha256"),
                "mask_file": f"{split}.mask.bin", "trained_tokens": int(sum(mask)),
            }  # fmt: skip
        meta = {
            "format_version": FORMAT_VERSION,
            "source": ", ".join(map(str, files)),
            "format": "chat",
            "template": "chatml",
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": hash_file(tmp / TOKENIZER_FILE, "sha256"),
                "spec": "chat",
                "type": type(tok).__name__,
            },  # fmt: skip
            "vocab_size": int(tok.vocab_size),
            "eot_token": tok.eot_token,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
