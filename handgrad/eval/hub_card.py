"""The Hugging Face Hub's metadata for a model card: the YAML block at the top of README.md.

The Hub reads ``license``, ``library_name``, ``tags``, ``datasets`` and ``model-index`` (the
evaluation results, shown as a table and on leaderboards) from it::

    ---
    license: mit
    library_name: handgrad
    tags: [text-generation, gpt2, handgrad]
    datasets: [Skylion007/openwebtext]
    model-index:
    - name: gpt2-124m-owt
      results:
      - task: {type: text-generation, name: Causal language modelling}
        dataset: {name: OpenWebText, type: Skylion007/openwebtext, split: validation}
        metrics:
        - {type: loss, name: Validation loss (nats/token), value: 2.764}
    ---

The dataset is named by what it is (the Hub's id where it has one), never by the local path
it was read from. Values are written as JSON, which YAML reads as the same scalars.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["dataset_identity", "front_matter"]

# built-in sources of `data prepare` -> (name, the Hub's dataset id or None)
KNOWN_DATASETS = {
    "shakespeare": ("tiny_shakespeare", "karpathy/tiny_shakespeare"),
    "openwebtext": ("OpenWebText", "Skylion007/openwebtext"),
    "pydocs": ("Python documentation", None),
}


def dataset_identity(source: str | None, data_format: str | None = None) -> tuple[str, str | None]:
    """(name, Hub id or None) of the data a run trained on, from ``[data] source`` or the
    source line ``data prepare`` wrote to meta.json."""
    if not source:
        return "unrecorded data", None
    for known, identity in KNOWN_DATASETS.items():  # a name, or prepare's "name: ..." line
        if source == known or source.startswith((f"{known}:", f"{known} ")):
            return identity
    local = re.match(r"local '([^']+)'", source)  # prepare's "local 'PATH': N file(s) ..."
    path = local.group(1) if local else source.split(",")[0].strip()
    stem = Path(path.rstrip("*/")).stem or "local text"
    return (f"{stem} (chat conversations)" if data_format == "chat" else stem), None


def _y(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def front_matter(
    title: str,
    source: str | None,
    data_format: str | None,
    val_loss: float,
    zero_shot: dict[str, Any] | None = None,
    license_id: str = "mit",
) -> str:
    """The YAML block (with its ``---`` lines) for a card titled ``title``: the validation
    loss (and perplexity, bits per token) and every zero-shot metric of ``zero_shot`` (lm-eval's
    results JSON) in model-index."""
    name, hub_id = dataset_identity(source, data_format)
    metrics = [
        ("loss", "Validation loss (nats/token)", val_loss),
        ("perplexity", "Validation perplexity", math.exp(val_loss) if val_loss < 700 else None),
        ("bits_per_token", "Bits per token", val_loss / math.log(2)),
    ]
    dataset = {"name": name, "type": hub_id or name, "split": "validation"}
    lines = [
        "---",
        f"license: {license_id}",
        "library_name: handgrad",
        "tags: [text-generation, gpt2, handgrad]",
    ]
    if hub_id:
        lines.append(f"datasets: [{_y(hub_id)}]")
    lines += ["model-index:", f"- name: {_y(title)}", "  results:"]
    lines += _result("text-generation", "Causal language modelling", dataset, metrics)
    for task, values in sorted(((zero_shot or {}).get("results") or {}).items()):
        found = [
            (key.partition(",")[0], key.partition(",")[0], v)
            for key, v in values.items()
            if "," in key and not key.partition(",")[0].endswith("_stderr")
            and isinstance(v, int | float) and not isinstance(v, bool)
        ]  # fmt: skip
        if found:
            zs = {"name": task, "type": task}
            lines += _result("text-generation", f"Zero-shot {task}", zs, found)
    lines.append("---")
    return "\n".join(lines) + "\n"


def _result(kind: str, task_name: str, dataset: dict[str, Any], metrics: list) -> list[str]:
    out = [
        f"  - task: {{type: {kind}, name: {_y(task_name)}}}",
        "    dataset: {" + ", ".join(f"{k}: {_y(v)}" for k, v in dataset.items()) + "}",
        "    metrics:",
    ]
    for kind_, name, value in metrics:
        if value is None or not math.isfinite(value):
            continue
        out.append(f"    - {{type: {_y(kind_)}, name: {_y(name)}, value: {_y(round(value, 6))}}}")
    return out
