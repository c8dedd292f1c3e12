"""Data: text sources -> `data prepare` -> token shards -> training batches.

from handgrad.data import prepare, TokenShards, get_batch

prepare("shakespeare", "char", "data/shakespeare_char", val_fraction=0.1)
data = TokenShards("data/shakespeare_char")          # checked against meta.json
x, y = get_batch(data.train, batch_size=12, block_size=64, rng=np.random.default_rng(0))
"""

from handgrad.data.prepare import prepare, token_dtype
from handgrad.data.shards import (
    TokenShards,
    get_batch,
    iter_batches_sequential,
    load_meta,
    load_split,
)
from handgrad.data.sources import TextSource, build_pydocs_corpus, open_source

__all__ = [
    "TextSource",
    "TokenShards",
    "build_pydocs_corpus",
    "get_batch",
    "iter_batches_sequential",
    "load_meta",
    "load_split",
    "open_source",
    "prepare",
    "token_dtype",
]
