"""`handgrad tokenizer train | encode | decode` sub-commands.

handgrad tokenizer train --input a.txt b.txt --vocab-size 8192 --out tok.json
handgrad tokenizer train --type char --input tinyshakespeare.txt --out char.json
echo "Hello world" | handgrad tokenizer encode --tokenizer tok.json      # prints ids
handgrad tokenizer decode --tokenizer tok.json 15496 995                 # prints text
handgrad tokenizer encode --tokenizer gpt2/ --text "Hello"   # a directory of GPT-2 files

--tokenizer takes a file saved by `train`, or a directory (or one of its files) with GPT-2's
vocab.json + merges.txt, OpenAI's encoder.json + vocab.bpe, or only Hugging Face's tokenizer.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handgrad.tokenizer.bpe import BPETokenizer
from handgrad.tokenizer.bytelevel import ENDOFTEXT, GPT2_PATTERN
from handgrad.tokenizer.char import CharTokenizer
from handgrad.tokenizer.load import load_tokenizer

_TOKENIZER_HELP = (
    "a tokenizer file saved by 'train', or a directory with vocab.json + merges.txt "
    "(or encoder.json + vocab.bpe, or a byte-level BPE tokenizer.json)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, encode or decode text")
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)

    train = commands.add_parser("train", help="train a BPE (or char) tokenizer on text files")
    train.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="UTF-8 text files (streamed, may exceed RAM)",
    )
    train.add_argument("--out", required=True, metavar="FILE.json")
    train.add_argument("--type", choices=("bpe", "char"), default="bpe")
    train.add_argument(
        "--vocab-size", type=int, help="bpe: 256 bytes + merges + special tokens (GPT-2: 50257)"
    )
    train.add_argument(
        "--special",
        nargs="*",
        default=[ENDOFTEXT],
        metavar="TOKEN",
        help=f"bpe special tokens, ids after the merges (default: {ENDOFTEXT})",
    )
    train.add_argument("--pattern", default=GPT2_PATTERN, help="pre-tokenization regex")
    train.set_defaults(func=cmd_train)

    encode = commands.add_parser("encode", help="print the token ids of --text or stdin")
    encode.add_argument("--tokenizer", required=True, metavar="PATH", help=_TOKENIZER_HELP)
    encode.add_argument("--text", help="text to encode (default: read stdin)")
    encode.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token strings (e.g. <|endoftext|>) as special ids",
    )
    encode.set_defaults(func=cmd_encode)

    decode = commands.add_parser("decode", help="print the text of ids (arguments or stdin)")
    decode.add_argument("--tokenizer", required=True, metavar="PATH", help=_TOKENIZER_HELP)
    decode.add_argument("ids", nargs="*", help="token ids (default: whitespace-separated stdin)")
    decode.set_defaults(func=cmd_decode)


def _error(message: str) -> int:
    print(f"handgrad tokenizer: error: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.input]
    for p in paths:
        if not p.is_file():
            return _error(f"{p}: no such file")
    try:
        if args.type == "char":
            texts = (p.read_text(encoding="utf-8") for p in paths)
            tok = CharTokenizer.train(texts)
        else:
            if args.vocab_size is None:
                return _error("--vocab-size is required for a bpe tokenizer")
            tok = BPETokenizer.train(
                paths, args.vocab_size, special_tokens=args.special, pattern=args.pattern
            )
    except (ValueError, UnicodeDecodeError) as e:
        return _error(str(e))
    tok.save(args.out)
    print(f"wrote {args.out}: {tok!r}", file=sys.stderr)
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    try:
        tok = load_tokenizer(args.tokenizer)
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    except (ValueError, OSError) as e:
        return _error(str(e))
    print(" ".join(map(str, ids)))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    words = args.ids if args.ids else sys.stdin.read().split()
    ids = []
    for position, word in enumerate(words):
        try:
            ids.append(int(word))
        except ValueError:
            return _error(f"token id #{position} is not an integer: {word!r}")
    try:
        text = load_tokenizer(args.tokenizer).decode(ids)
    except (ValueError, OSError) as e:
        return _error(str(e))
    sys.stdout.write(text)
    return 0
