"""The model card in the original GPT-2 card's shape: each element checked against the
run's own files (a tiny run trained here through the trainer API)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from handgrad.cli import main
from handgrad.eval.card_text import cell, duration, short
from handgrad.eval.report import write_report

TEXT = (
    "It was a dark and stormy night; the rain fell in torrents, except at occasional "
    "intervals, when it was checked by a violent gust of wind which swept up the streets. "
) * 30

SECTIONS = [
    "## Model description",
    "## Intended uses & limitations",
    "### How to use",
    "### Limitations",
    "## Training data",
    "## Training procedure",
    "### Preprocessing",
    "### Training",
    "## Evaluation results",
    "### Zero-shot results",
    "## Loss curve",
    "## Appendix: full resolved configuration",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from handgrad.data import prepare
    from handgrad.train import load_config, train

    root = tmp_path_factory.mktemp("card")
    (root / "corpus.txt").write_text(TEXT)
    data = root / "data"
    prepare(str(root / "corpus.txt"), "train:300", data, val_fraction=0.2, workers=1,
            progress=False)  # fmt: skip
    cfg = load_config({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "data": {"source": str(data)},
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 2, "decay_steps": 20,
                  "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 0.5},
        "train": {"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2,
                  "log_interval": 1, "sample_tokens": 4, "seed": 3, "checkpoint_interval": 3},
        "eval": {"interval": 3, "batches": 2, "sample_prompt": "\n"},
    })  # fmt: skip
    train(cfg, root / "run", progress=False, log=lambda msg: None)
    return root / "run", data


@pytest.fixture(scope="module")
def card(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("card_out") / "MODEL_CARD.md"
    assert main(["report", "--checkpoint", str(run[0]), "--out", str(path)]) == 0
    return path.read_text()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def row(text, label):
    """The cells of the table row whose first cell is ``label``."""
    for line in text.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no row {label!r}")


def test_sections_follow_the_original_card(card):
    headings = [line for line in card.splitlines() if line.startswith("#")]
    assert headings[0].startswith("# Model card: ")
    assert [h for h in headings if h.startswith("##")] == SECTIONS


def test_optimizer_schedule_and_clipping_in_words(card):
    optimizer = row(card, "Optimizer")[1]
    assert optimizer.startswith("AdamW (lr 6e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1")
    assert row(card, "Learning-rate schedule")[1] == (
        "cosine with 2 warm-up steps, min lr 6e-5, decay over 20 steps"
    )
    assert row(card, "Gradient clipping")[1] == "global gradient norm clipped to 0.5"


def test_global_batch_is_micro_x_accumulation_x_processes(card):
    assert row(card, "Global batch")[1] == (
        "4 sequences = 2 (micro batch) x 2 (accumulation) x 1 (processes) of 16 tokens = "
        "64 tokens per step"
    )
    assert row(card, "Steps")[1] == "6 of 6 planned"
    assert row(card, "Tokens seen")[1] == "384"


def test_dataset_from_the_datas_meta(card, run):
    meta = json.loads((run[1] / "meta.json").read_text())
    section = card.split("## Training data")[1].split("## Training procedure")[0]
    assert meta["source"] in section
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert row(section, split)[1:] == [f"{s['documents']:,}", f"{s['tokens']:,}",
                                          f"{s['bytes']:,}"]  # fmt: skip


def test_eval_line_and_validation_numbers(card, run):
    last = [r for r in records(run[0]) if "val_loss" in r][-1]
    assert "Eval: mean val loss over 2 batches of 2 windows of 16 tokens (64 tokens)" in card
    assert row(card, "Validation loss (nats/token)")[1] == f"{last['val_loss']:,.4f}"
    assert row(card, "Validation perplexity")[1] == f"{last['val_ppl']:,.4f}"
    assert row(card, "Bits per token")[1] == f"{last['val_bpt']:,.4f}"


def test_tokenizer_paragraph(card, run):
    tok = json.loads((run[1] / "tokenizer.json").read_text())
    merges = len(tok["merges"])
    assert tok["vocab_size"] == 256 + merges + 1  # the fixture's BPE: bytes, merges, eot
    assert (
        f"a byte-level BPE of {tok['vocab_size']:,} tokens: 256 byte tokens, {merges} merges "
        "and 1 special token(s), learnt (`train:300`) on the training split of local"
    ) in card
    assert row(card, "Merges")[1] == str(merges)
    assert f"end-of-text token (id {tok['special_tokens']['<|endoftext|>']})" in card


def test_zero_shot_table_direction_stderr_and_tokenizer_note(run, tmp_path):
    zs = {
        "results": {"hg_wikitext2": {"word_perplexity,none": 812.25,
                                     "word_perplexity_stderr,none": "N/A",
                                     "bits_per_byte,none": 2.5,
                                     "bits_per_byte_stderr,none": 0.125},
                    "lambada_openai": {"acc,none": 0.25, "acc_stderr,none": 0.0625}},
        "higher_is_better": {"hg_wikitext2": {"word_perplexity": False, "bits_per_byte": False},
                             "lambada_openai": {"acc": True}},
        "config": {"limit": 5, "model_args": {"checkpoint": str(run[0])}},
    }  # fmt: skip
    (tmp_path / "zs.json").write_text(json.dumps(zs))
    out = write_report(run[0], tmp_path / "card.md", zero_shot=tmp_path / "zs.json")
    text = out.read_text()
    assert "| Task | Metric | Better | Value | Stderr |" in text
    assert "| WikiText-2 | word_perplexity | ↓ | 812.2500 | n/a |" in text
    assert "| WikiText-2 | bits_per_byte | ↓ | 2.5000 | 0.1250 |" in text
    assert "| LAMBADA (OpenAI) | acc | ↑ | 0.2500 | 0.0625 |" in text
    assert "↑ higher is better, ↓ lower is better" in text
    assert "at most 5 documents per task" in text
    note = "bits_per_byte, byte_perplexity and word_perplexity are normalised by the bytes or words"
    assert note in text and "tokenizer-independent" in text
    assert "token-level perplexity above is not" in text


def test_limitations_name_the_undertraining(card, run, tmp_path):
    # the full run stopped at max_steps but the cosine was planned over 20 steps
    section = card.split("### Limitations")[1].split("## Training data")[0]
    assert "the cosine decay spans 20 steps, training ran 6" in section
    assert "384 tokens for" in section and "tokens per parameter" in section
    # the step-3 checkpoint of the same run: 3 of the 6 planned steps
    out = write_report(run[0] / "checkpoints" / "step_0000003", tmp_path / "c3.md")
    text = out.read_text()
    assert "Undertrained relative to its own schedule: 3 of 6 steps" in text
    # and its numbers are step 3's, not those the run logged after it
    at3 = [r for r in records(run[0]) if r["step"] == 3][0]
    assert row(text, "Validation loss (nats/token)")[1] == f"{at3['val_loss']:,.4f}"
    assert row(text, "Final training loss")[1] == f"{at3['train_loss']:,.4f} nats/token (step 3)"


def test_newline_values_stay_in_one_cell(card):
    assert '| eval.sample_prompt | `"\\n"` |' in card
    assert "| train.loggers | `[]` |" in card
    # every table row has as many cells as its header
    for block in card.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            widths = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
            assert len(widths) == 1, block


def test_training_time_in_readable_units_and_hardware(card, run):
    state = json.loads((run[0] / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    hw = state["hardware"]
    assert hw["processes"] == 1 and hw["logical_cores"] >= 1 and hw["device"] == "cpu"
    assert hw["array_module"] == "numpy" and hw["cpu"]
    time_cell = row(card, "Training time")[1]
    assert re.fullmatch(r"\d+\.\d s \([\d,]+ tokens/s\)", time_cell), time_cell
    hardware = row(card, "Hardware")[1]
    assert hardware.startswith(f"{hw['cpu']}, {hw['logical_cores']} logical cores")
    assert "1 training process" in hardware and "CPU (NumPy)" in hardware


def test_card_without_hardware_or_data_dir(run, tmp_path):
    # a run from before hardware was recorded, whose prepared data has since moved
    copy = tmp_path / "old"
    shutil.copytree(run[0], copy)
    state_path = copy / "checkpoints" / "step_0000006" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["hardware"]
    state["data"]["dir"] = str(tmp_path / "gone")
    state_path.write_text(json.dumps(state))
    config_path = copy / "checkpoints" / "step_0000006" / "config.json"
    config = json.loads(config_path.read_text())
    config["data"]["source"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))
    text = write_report(copy, tmp_path / "card.md").read_text()
    assert row(text, "Hardware")[1] == "not recorded"
    assert "no longer at the recorded path" in text


def test_bad_metrics_line_names_file_and_line(run, tmp_path, capsys):
    copy = tmp_path / "bad"
    shutil.copytree(run[0], copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n")
    n = len((copy / "metrics.jsonl").read_text().splitlines())
    assert main(["report", "--checkpoint", str(copy), "--out", str(tmp_path / "c.md")]) != 0
    assert f"metrics.jsonl:{n}: expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5.94, "5.9 s"), (59.9, "59.9 s"), (125.0, "2 min 5 s"), (7620.0, "2 h 7 min")],
)
def test_duration_units(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(6e-4, "6e-4"), (1e-8, "1e-8"), (2.5e-3, "2.5e-3"), (0.95, "0.95"), (0.1, "0.1"),
     (1.0, "1.0"), (1000, "1,000"), (600_000, "600,000")],
)  # fmt: skip
def test_short_numbers(value, text):
    assert short(value) == text


def test_cell_escapes_pipes_and_newlines():
    assert cell("a|b\nc\r\nd") == "a\\|b<br>c<br>d"
