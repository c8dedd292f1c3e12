"""``handgrad eval zero-shot``: the GPT-2 paper's zero-shot suite through lm-evaluation-harness.

Runs ``lm_eval.simple_evaluate`` in-process with the ``handgrad`` model (or any lm-eval model,
e.g. ``hf`` for the parity tests) and a ``TaskManager`` that also indexes the task YAMLs
shipped in ``handgrad/eval/tasks``, then prints lm-eval's own results table.

With ``data_dir`` every task reads a local copy instead of the Hugging Face hub: the task's
evaluation split is ``<data_dir>/<task>/test.jsonl``, one JSON object per line with the hub
dataset's fields (see tasks/README.md). The shipped config is loaded and its dataset is
overridden (``dataset_path: json`` + ``data_files``); the task keeps its name.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# The zero-shot table of Radford et al. (2019), "Language Models are Unsupervised Multitask
# Learners", in its column order; lambada_openai is lm-eval's own task.
SUITES: dict[str, list[str]] = {
    "gpt2-paper": [
        "lambada_openai",
        "hg_cbt_cn",
        "hg_cbt_ne",
        "hg_wikitext2",
        "hg_ptb",
        "hg_enwik8",
        "hg_text8",
        "hg_wikitext103",
        "hg_lm1b",
    ],
}

LOCAL_FILE = "test.jsonl"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "handgrad eval zero-shot needs lm-evaluation-harness: pip install 'handgrad[eval]' "
            f"(or pip install lm-eval) ({e})"
        ) from None


@functools.cache
def task_manager():
    """lm-eval's TaskManager over its built-in tasks plus ours (built once per process:
    indexing lm-eval's thousands of YAML files takes seconds)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def resolve_tasks(tasks: str | list[str] | None, suite: str | None) -> list[str]:
    if bool(tasks) == bool(suite):
        raise ValueError("zero-shot: give exactly one of --tasks T1,T2 and --suite NAME")
    if suite:
        if suite not in SUITES:
            raise ValueError(f"zero-shot: unknown suite {suite!r}; known: {', '.join(SUITES)}")
        return list(SUITES[suite])
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)  # type: ignore[union-attr]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("zero-shot: --tasks is empty")
    return names


def local_task_configs(names: list[str], data_dir: str | os.PathLike, manager: Any) -> list[dict]:
    """Full task configs that read ``<data_dir>/<task>/test.jsonl`` instead of the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    data_dir = Path(data_dir)
    configs = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"zero-shot: unknown task {name!r} (not a task with a YAML config)")
        path = data_dir / name / LOCAL_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"zero-shot --data-dir: {path} not found (task {name} reads its evaluation "
                f"split from <data-dir>/{name}/{LOCAL_FILE}; see handgrad/eval/tasks/README.md)"
            )
        config = load_yaml(entry.yaml_path, resolve_func=True)
        split = config.get("test_split") or config.get("validation_split")
        for key in ("training_split", "validation_split", "fewshot_split", "test_split"):
            config.pop(key, None)
        config["test_split"] = split
        config["dataset_path"] = "json"
        config["dataset_name"] = None
        config["dataset_kwargs"] = {"data_files": {split: str(path.resolve())}}
        configs.append(config)
    return configs


def run_zero_shot(
    tasks: str | list[str] | None = None,
    suite: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    model: str | Any = "handgrad",
    model_args: str | dict | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
    data_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100_000,
    log_samples: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for the tasks (see ``simple_evaluate``).

    ``model`` is an lm-eval model name (default ``handgrad``, whose ``model_args`` default to
    ``checkpoint=...,batch_size=...``, and ``device=...`` when given) or an
    ``lm_eval.api.model.LM`` instance."""
    _require_lm_eval()
    import lm_eval

    import handgrad.eval.lm_eval_model  # noqa: F401  (registers "handgrad")

    names = resolve_tasks(tasks, suite)
    manager = task_manager()
    specs: list[Any] = names
    if data_dir is not None:
        specs = local_task_configs(names, data_dir, manager)
    if model == "handgrad" and model_args is None:
        if checkpoint is None:
            raise ValueError("zero-shot: --checkpoint is required")
        model_args = {"checkpoint": str(checkpoint)}
        if device is not None:
            model_args["device"] = device
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=specs,
        batch_size=batch_size,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")
    return results


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table (plus the groups table when there are groups)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """The results as JSON (lm-eval's format, per-sample logs left out), written atomically."""
    from lm_eval.utils import handle_non_serializable

    from handgrad.fileio import write_text_atomic

    slim = {k: v for k, v in results.items() if k != "samples"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(slim, indent=2, default=handle_non_serializable) + "\n")
