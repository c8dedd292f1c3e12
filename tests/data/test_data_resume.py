"""`data prepare` resumes: killed at random moments (SIGKILL) or interrupted after a few chunks, and
run again with the same command, it ends with the bytes of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from handgrad.data import prepare
from handgrad.data.prepare import PreparationRefused

prepare_module = sys.modules["handgrad.data.prepare"]
ENCODE_ALL = prepare_module.encode_all
REPO = Path(__file__).resolve().parents[2]
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
WORDS = "the of and to in a is that for it as was with be by on not he I this are or his".split()


def documents(n: int, seed: int = 0) -> list[str]:
    """Seeded text: common words and random strings, so new pre-tokens keep coming."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [
            rng.choice(WORDS)
            if rng.random() < 0.7
            else "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
            for _ in range(rng.randint(20, 400))
        ]
        docs.append(" ".join(words) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def run(source, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("val_fraction", 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(source, kw.pop("tokenizer", "train:300"), out, **kw)


def contents(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in FILES}


SCRIPT = """
import sys, warnings
from handgrad.data import prepare
warnings.simplefilter("ignore")
prepare(sys.argv[1], "train:400", sys.argv[2], val_fraction=0.05, workers=int(sys.argv[3]),
        chunk_chars=10_000, progress=False, checkpoint_seconds=0)
"""


@pytest.mark.slow
def test_killed_at_random_moments_ends_byte_identical(tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(8000))  # long enough for 6 kills
    reference = tmp_path / "reference"
    run(source, reference, tokenizer="train:400", chunk_chars=10_000)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = random.Random(20)
    kills, resumed_with_tokens, tokenizer_stamp = 0, 0, None
    for attempt in range(30):
        workers = 1 + attempt % 2  # the worker count may change between runs
        cmd = [sys.executable, "-c", SCRIPT, str(source), str(out), str(workers)]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
        if kills < 6:
            if kills % 2 == 0:  # any moment: start-up, learning the tokenizer, tokenizing, ...
                time.sleep(rng.uniform(0.2, 1.5))
            else:  # a moment while tokenizing: soon after the next checkpoint
                before = documents_done(out)
                deadline = time.monotonic() + 120
                while documents_done(out) <= before and proc.poll() is None:
                    assert time.monotonic() < deadline, "no progress in 120 s"
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None and kills < 6:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
            proc.wait()
            kills += 1
            resumed_with_tokens += documents_done(out) > 0
            if (out / "tokenizer.json").is_file():
                stamp = (out / "tokenizer.json").stat().st_mtime_ns
                assert tokenizer_stamp in (None, stamp), "the learnt tokenizer was learnt again"
                tokenizer_stamp = stamp
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        break
    assert kills == 6 and resumed_with_tokens >= 3, (kills, resumed_with_tokens)
    assert contents(out) == contents(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no progress or temp files


def documents_done(out: Path) -> int:
    """Documents recorded in out/progress.json's checkpoint (0 when there is none)."""
    try:
        checkpoint = json.loads((out / "progress.json").read_text())["checkpoint"]
    except (OSError, ValueError):
        return 0
    return sum(s["documents"] for s in checkpoint["splits"].values()) if checkpoint else 0


def write_parquet(path: Path, docs: list[str]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": docs}), path, row_group_size=37)
    return path


def write_txt_dir(root: Path, docs: list[str]) -> Path:
    root.mkdir()
    for i, d in enumerate(docs):
        (root / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    return root


def interrupt_after(monkeypatch, n_chunks: int) -> None:
    def stop(*args):
        for i, item in enumerate(ENCODE_ALL(*args)):
            if i == n_chunks:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prepare_module, "encode_all", stop)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "openwebtext"])
def test_interrupted_and_resumed_several_times(kind, tmp_path, monkeypatch):
    docs = documents(120, seed=3)
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "c.jsonl", docs)
    elif kind == "parquet":
        source = write_parquet(tmp_path / "c.parquet", docs)
    elif kind == "txt":
        source = write_txt_dir(tmp_path / "txt", docs)
    else:  # the hub's schema, streamed by `datasets` from a local stand-in
        pytest.importorskip("datasets")
        stand_in = write_parquet(tmp_path / "train-00000-of-00001.parquet", docs)
        monkeypatch.setenv("HANDGRAD_OPENWEBTEXT_DATA_FILES", str(stand_in))
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        source = "openwebtext"
    kw = {"chunk_chars": 1500, "checkpoint_seconds": 0}
    reference = run(source, tmp_path / "reference", **kw)
    out = tmp_path / "out"
    for n_chunks in (2, 1, 3, 4):  # each run writes a few chunks more, then stops
        interrupt_after(monkeypatch, n_chunks)
        with pytest.raises(KeyboardInterrupt):
            run(source, out, **kw)
        monkeypatch.setattr(prepare_module, "encode_all", ENCODE_ALL)
        assert not (out / "meta.json").exists()
        with open(out / "train.bin.partial", "ab") as f:  # written after the checkpoint
            f.write(b"\x01\x02\x03")
    progress = json.loads((out / "progress.json").read_text())
    assert progress["checkpoint"]["splits"]["train"]["documents"] > 0
    assert run(source, out, **kw) == reference
    assert contents(out) == contents(tmp_path / "reference")
    assert (
        reference["splits"]["train"]["documents"] + reference["splits"]["val"]["documents"] == 120
    )


def test_different_preparation_refused_while_unfinished(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "c.jsonl", documents(60))
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(source, out, chunk_chars=1500, checkpoint_seconds=0)
    with pytest.raises(PreparationRefused, match="another preparation, unfinished"):
        run(source, out, seed=7)
    write_jsonl(source, documents(61))  # the source changed under the preparation
    with pytest.raises(PreparationRefused, match=r"source files \(names, sizes"):
        run(source, out)


MEMORY_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import handgrad.tokenizer.bpe as bpe
from handgrad.data import prepare
# the word cache is capped (bpe.WORD_CACHE_SIZE words, ~20 MB when full); a small cap here
# keeps it from hiding, or being mistaken for, growth anywhere else
bpe.WORD_CACHE_SIZE = 4096
prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, progress=False)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) // 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    tokenizer = tmp_path / "reference" / "tokenizer.json"
    run(write_jsonl(tmp_path / "small.jsonl", documents(300)), tmp_path / "reference")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    peaks = {}
    for n_docs in (2000, 16000):  # about 1.9 MB and 15 MB of text, 0.6M and 5M tokens
        source = write_jsonl(tmp_path / f"c{n_docs}.jsonl", documents(n_docs, seed=n_docs))
        cmd = [sys.executable, "-c", MEMORY_SCRIPT, str(source), str(tokenizer)]
        proc = subprocess.run(
            [*cmd, str(tmp_path / f"o{n_docs}")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        peaks[n_docs] = int(proc.stdout.split()[-1])
    # 13 MB more text and 4.4M more tokens (9 MB as uint16, 35 MB as int64) cost almost nothing
    assert peaks[16000] - peaks[2000] < 6, peaks


def test_progress_lines_when_not_a_terminal(tmp_path):
    import io

    from handgrad.data.report import Progress

    stream = io.StringIO()  # not a terminal: plain lines, no bar
    report = Progress(True, total_bytes=4_000_000, stream=stream, interval=0)
    report.update(documents=10, text_bytes=1_000_000, tokens=250_000, input_bytes=1_000_000)
    report.update(documents=10, text_bytes=1_000_000, tokens=250_000, input_bytes=2_000_000)
    report.close(summary={})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert lines[1].startswith("data prepare: 20 documents, 2.0 MB of text, 500,000 tokens; ")
    assert "MB/s" in lines[1] and "50% of the input, ETA " in lines[1]
    assert lines[2].startswith("data prepare: done: 20 documents")
    quiet = io.StringIO()
    report = Progress(True, total_bytes=None, stream=quiet, interval=3600)
    report.update(documents=1, text_bytes=10, tokens=3, input_bytes=10)
    assert quiet.getvalue() == ""  # sparse: nothing before the interval
    report = Progress(True, None, start={"documents": 5, "text_bytes": 9, "tokens": 7, "input": 9},
                      stream=quiet)  # fmt: skip
    assert "resuming after 5 documents" in quiet.getvalue()
