"""``handgrad eval`` reproduces the trainer's validation numbers, and ``handgrad report``
writes a card whose numbers are the run's (a tiny run trained here through the trainer API)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from handgrad.cli import main

TEXT = (
    "It was a dark and stormy night; the rain fell in torrents, except at occasional "
    "intervals, when it was checked by a violent gust of wind which swept up the streets. "
) * 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from handgrad.data import prepare
    from handgrad.train import load_config, train

    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(TEXT)
    data = root / "data"
    prepare(str(root / "corpus.txt"), "char", data, val_fraction=0.2, workers=1, progress=False)
    cfg = load_config({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "data": {"source": str(data)},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        # 2 processes x 2 windows: the trainer evaluates batches of 4 windows
        "train": {"max_steps": 6, "micro_batch_size": 2, "processes": 2, "log_interval": 1,
                  "sample_tokens": 0, "seed": 3},
        "eval": {"interval": 3, "batches": 2},
    })  # fmt: skip
    train(cfg, root / "run", progress=False, log=lambda msg: None)
    return root / "run", data


def test_eval_reproduces_the_trainers_validation_loss(trained, tmp_path, capsys):
    run, data = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    out = tmp_path / "val.json"
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["loss"] == last["val_loss"]  # the same batches, the same function: exactly
    assert m["perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert m["bits_per_token"] == pytest.approx(last["val_loss"] / math.log(2))
    assert m["tokens"] == 2 * 4 * 16
    assert "bits/token" in capsys.readouterr().out
    # fewer batches: a different (prefix) set of windows, so in general a different loss
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--batches", "1",
                 "--output", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["tokens"] == 4 * 16


def test_eval_without_data_reads_the_runs_own(trained, tmp_path, capsys):
    run, data = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "val.json"
    assert main(["eval", "--checkpoint", str(run), "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["data"] == str(data.resolve())
    assert m["loss"] == [r for r in records if "val_loss" in r][-1]["val_loss"]
    # a run whose data is gone: one line saying what to give
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    state = next(moved.glob("checkpoints/*/trainer_state.json"))
    saved = json.loads(state.read_text())
    saved["data"]["dir"] = str(tmp_path / "gone")
    state.write_text(json.dumps(saved))
    (state.parent / "manifest.json").unlink()  # edited by hand: no longer what was written
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(moved)]) == 1
    err = capsys.readouterr().err
    assert "holds no prepared data any more" in err and "--data DIR" in err


def test_report_numbers_come_from_the_run(trained, tmp_path, capsys):
    run, _ = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    zs = {
        "results": {"hg_cbt_cn": {"alias": "hg_cbt_cn", "acc,none": 0.125,
                                  "acc_stderr,none": 0.0625},
                    "hg_ptb": {"word_perplexity,none": 321.5,
                               "word_perplexity_stderr,none": "N/A"}},
        "higher_is_better": {"hg_cbt_cn": {"acc": True}, "hg_ptb": {"word_perplexity": False}},
        "config": {"model_args": f"checkpoint={run},device=cpu"},  # as lm-eval writes it
    }  # fmt: skip
    (tmp_path / "zs.json").write_text(json.dumps(zs))
    card = tmp_path / "card" / "MODEL_CARD.md"
    # results of another checkpoint never reach the card
    other = {**zs, "config": {"model_args": {"checkpoint": str(tmp_path / "elsewhere")}}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["report", "--checkpoint", str(run), "--zero-shot", str(tmp_path / "other.json"),
                 "--out", str(card)]) == 1  # fmt: skip
    assert "these zero-shot results are of checkpoint" in capsys.readouterr().err
    assert not card.exists()
    assert main(["report", "--checkpoint", str(run), "--zero-shot", str(tmp_path / "zs.json"),
                 "--out", str(card)]) == 0  # fmt: skip
    text = card.read_text()
    # the Hub's metadata first: the results in model-index, the data named by what it is
    import yaml

    head = yaml.safe_load(text.split("---\n")[1])
    assert head["library_name"] == "handgrad" and head["license"] == "mit"
    (result, *zero_shot) = head["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == round(evals[-1]["val_loss"], 6)
    assert result["dataset"]["name"] == "corpus" and "datasets" not in head
    assert str(tmp_path.parent) not in text.split("---\n")[1]  # no local path
    assert {z["dataset"]["name"] for z in zero_shot} == {"hg_cbt_cn", "hg_ptb"}
    assert f"{evals[-1]['val_loss']:,.4f}" in text
    assert f"{evals[-1]['val_ppl']:,.4f}" in text
    assert f"{evals[0]['val_loss']:,.4f} (step {evals[0]['step']})" in text
    assert "6 of 6 planned" in text
    assert f"{records[-1]['tokens']:,}" in text and "| Tokens per step | 64 |" in text
    assert "| CBT-CN | acc | ↑ | 0.1250 | 0.0625 |" in text
    assert "| PTB | word_perplexity | ↓ | 321.5000 | n/a |" in text
    assert "| Merges | n/a (character level) |" in text
    assert "optim.lr" in text
    image = [line for line in text.splitlines() if line.startswith("![")][0]
    name = image[image.index("(") + 1 : -1]
    assert (card.parent / name).read_bytes() == (run / "loss.png").read_bytes()


def test_hub_names_of_the_built_in_datasets():
    from handgrad.eval.hub_card import dataset_identity

    assert dataset_identity("openwebtext") == ("OpenWebText", "Skylion007/openwebtext")
    assert dataset_identity("shakespeare") == ("tiny_shakespeare", "karpathy/tiny_shakespeare")
    assert dataset_identity("/home/me/data/chats.jsonl", "chat") == (
        "chats (chat conversations)",
        None,
    )
