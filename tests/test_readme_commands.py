"""README's command blocks run as a user would type them, in order, in one fresh directory.

Each ```bash block is preceded by a marker: ``<!-- readme-test: run -->``, or
``<!-- readme-test: skip (REASON) -->`` for what needs a GPU, the network or an install. The
run blocks are executed line by line with small sizes, so that the whole README takes about
a minute: a vocabulary of 300, a few steps, one evaluation batch. The files the examples name
(``corpus.txt``, ``corpus/*.jsonl``, ``chats.jsonl``, a Hugging Face GPT-2 in ``gpt2/``) are
made here first, small; tiny Shakespeare comes from ../shared/data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MARKER = re.compile(
    r"<!-- readme-test: (run|skip \((?P<why>[^)]+)\)) -->\n```(bash|python)\n(.*?)```", re.S
)
# what a run of a README line is given so that it takes seconds, not hours
SMALL = {
    "train": ["--set", "eval.batches=1", "--set", "eval.interval=0", "--set", "optim.warmup_steps=1", "--set",
              "train.sample_tokens=0", "--set", "train.log_interval=1", "--no-progress"],
    "finetune": ["--set", "train.block_size=32", "--set", "train.grad_accum_steps=2"],
}  # fmt: skip


def blocks(text: str) -> list[tuple[str, str | None, str, list[str]]]:
    """(kind, reason, language, lines) of every marked block; a bash block without a marker
    fails. A python block's lines are its source, run as one program."""
    found = MARKER.findall(text)
    total = text.count("```bash\n")
    marked = sum(lang == "bash" for _, _, lang, _ in found)
    assert marked == total, (
        f"{total - marked} bash block(s) of README.md have no <!-- readme-test: run --> or "
        "<!-- readme-test: skip (reason) --> line right above them"
    )
    out = []
    for kind, why, lang, body in found:
        if lang == "python":
            out.append((kind.split()[0], why or None, lang, [body]))
            continue
        lines = [ln.split("  #")[0].strip() for ln in body.splitlines()]
        out.append((kind.split()[0], why or None, lang, [ln for ln in lines if ln]))
    return out


def small(line: str) -> list[str]:
    """The command of a README line at test size."""
    argv = shlex.split(line)
    argv = [re.sub(r"^train:\d+$", "train:300", a) for a in argv]
    for i, a in enumerate(argv):
        if argv[i - 1] == "--vocab-size":
            argv[i] = "300"
        steps = re.match(r"^train\.max_steps=(\d+)$", a)
        if steps:  # later lines resume to more steps than earlier ones: keep the order
            argv[i] = f"train.max_steps={max(2, int(steps.group(1)) // 250)}"
    if argv[:2] == ["handgrad", "train"]:
        if not any(a.startswith("train.max_steps=") for a in argv):
            argv += ["--set", "train.max_steps=2"]
        argv += SMALL["train"]
        if "finetune-shakespeare" in argv:
            argv += SMALL["finetune"]
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh directory with the small files the README's examples read."""
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from handgrad.tokenizer import BPETokenizer

    root = tmp_path_factory.mktemp("readme")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    (root / "corpus.txt").write_text(text[:60_000], encoding="utf-8")
    (root / "corpus").mkdir()
    for i in range(2):
        docs = [{"text": text[j : j + 2000]} for j in range(i * 40_000, (i + 1) * 40_000, 2000)]
        (root / "corpus" / f"part{i}.jsonl").write_text(
            "".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8"
        )
    chats = [
        {"messages": [{"role": "user", "content": f"Who speaks line {i}?"},
                      {"role": "assistant", "content": f"ROMEO speaks line {i}."}]}
        for i in range(40)
    ]  # fmt: skip
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    tok = BPETokenizer.train(text[:100_000], vocab_size=256 + 64)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=tok.vocab_size,
        bos_token_id=tok.eot_token, eos_token_id=tok.eot_token,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    tok.export_hf(root / "gpt2")
    (root / "gpt2_dir").symlink_to(root / "gpt2")
    return root


def test_every_bash_block_has_a_marker():
    kinds = [kind for kind, _, _, _ in blocks(README.read_text(encoding="utf-8"))]
    assert "run" in kinds and "skip" in kinds


def test_readme_commands_run_as_written(workdir):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HANDGRAD_CACHE": str(workdir / "cache"),
        "HANDGRAD_SHAKESPEARE": str(SHAKESPEARE),
        "OMP_NUM_THREADS": "1",
    }
    ran = 0
    for kind, _, lang, lines in blocks(README.read_text(encoding="utf-8")):
        if kind != "run":
            continue
        for line in lines:
            argv = small(line) if lang == "bash" else [sys.executable, "-c", line]
            done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            assert done.returncode == 0, f"README: `{line}` failed:\n{done.stdout}\n{done.stderr}"
            if lang == "python":
                assert "loss " in done.stdout, done.stdout
            ran += 1
    assert ran >= 15
    # what the examples promise is there
    assert (workdir / "runs" / "sc" / "latest").is_file()
    assert (workdir / "MODEL_CARD.md").read_text(encoding="utf-8").startswith("---\n")
    assert (workdir / "hf_model" / "config.json").is_file()
