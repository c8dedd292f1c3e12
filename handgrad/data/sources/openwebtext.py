"""OpenWebText, streamed from the Hugging Face hub with `datasets` (or rows passed in)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from handgrad.data.sources.base import (
    Document,
    SourceStats,
    TextSource,
    _Warner,
    import_optional,
)

# The hub repo still carries a legacy loading script (`openwebtext.py`), which `datasets` >= 4 refuses
# to run; the same data is published as parquet shards in the repo's data/ folder, so we stream
# those with the generic parquet builder. The revision is pinned so the corpus cannot change
# under a run.
OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_REVISION = "963532436460638ab26b7633e23776e6c7e37d59"
OPENWEBTEXT_DATA_FILES = (
    f"hf://datasets/{OPENWEBTEXT_ID}@{OPENWEBTEXT_REVISION}/data/train-*.parquet"
)


def openwebtext_data_files() -> str:
    """The parquet shards to stream: $HANDGRAD_OPENWEBTEXT_DATA_FILES (another revision, a mirror,
    or a local copy such as /data/owt/*.parquet) or the pinned hub revision."""
    return os.environ.get("HANDGRAD_OPENWEBTEXT_DATA_FILES") or OPENWEBTEXT_DATA_FILES


def openwebtext_rows(data_files: str) -> Iterable[dict[str, Any]]:
    """Stream OpenWebText rows ({"text": ...}) with `datasets`, never holding the corpus in RAM.
    Each iteration streams from the first row again. A hub that cannot be reached is one
    error saying so and what to do instead."""
    return _Rows(data_files)


class _Rows:
    def __init__(self, data_files: str) -> None:
        self.data_files, self.dataset = data_files, None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            if self.dataset is None:
                datasets = import_optional("datasets")
                self.dataset = datasets.load_dataset(
                    "parquet", data_files={"train": self.data_files}, split="train", streaming=True
                )
            yield from self.dataset
        except (ConnectionError, TimeoutError) as err:
            raise _unreachable(self.data_files, err) from None
        except Exception as err:  # httpx / huggingface_hub errors name the network in their type
            if not _is_network_error(err):
                raise
            raise _unreachable(self.data_files, err) from None


def _is_network_error(err: BaseException) -> bool:
    kinds = [type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None]
    return any(k.endswith(("ConnectError", "ConnectionError", "Timeout", "OfflineModeIsEnabled"))
               for k in kinds)  # fmt: skip


def _unreachable(data_files: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"openwebtext streams {data_files} from the Hugging Face hub, which cannot be reached "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); connect to "
        "the network, or point HANDGRAD_OPENWEBTEXT_DATA_FILES (or [data] source) at a local "
        "copy of its parquet files"
    )


def openwebtext_source(
    rows: Iterable[dict[str, Any]] | None = None, text_field: str = "text"
) -> TextSource:
    if rows is None:
        data_files = openwebtext_data_files()
        rows = openwebtext_rows(data_files)
        description = f"openwebtext: {data_files}"
    else:
        description = "openwebtext: injected rows"

    def read(stats: SourceStats, warn: _Warner, start: dict | None) -> Iterator[Document]:
        # Resuming skips the rows already done without tokenizing them; from the hub they are
        # still streamed (datasets reads parquet shards from their start).
        first = start["row"] if start else 0
        done = start["bytes"] if start else 0
        for i, row in enumerate(islice(rows, first, None), start=first):
            if text_field not in row:
                raise ValueError(
                    f"openwebtext row {i}: no {text_field!r} field (keys: {', '.join(row)})"
                )
            text = row[text_field] or ""
            done += len(text)  # characters: a cheap stand-in for bytes, only shown in progress
            yield f"openwebtext row {i}", text, {"row": i + 1, "bytes": done}

    return TextSource(description, read, fingerprint=description)
