"""Training data: files in, correctly masked token samples out.

``prepare_data(cfg, tokenizer, sink)`` is what the trainer calls; ``collate`` turns samples
into batches; ``inspect_data`` describes a dataset for the CLI, the desktop app and the
VRAM budget. The modules, in the order data flows through them:

* ``sources``: read JSONL / JSON / CSV / TSV / Parquet / text / saved folders / hub ids, row by row;
* ``formats``: detect the format with evidence, map columns, normalize rows;
* ``encode``: chat template, loss mask, closing EOS;
* ``store``: compact sample arrays, validation split, packing, ``collate``;
* ``cache``: tokenized data kept between runs;
* ``pipeline``: ``prepare_data``; ``inspect``: ``inspect_data`` and the ``inspect-data`` command.
"""

from qlora_engine.data.encode import CHATML_TEMPLATE
from qlora_engine.data.inspect import add_cli, inspect_data, inspect_data_main
from qlora_engine.data.pipeline import PreparedData, prepare_data
from qlora_engine.data.store import IGNORE_INDEX, SampleSet, collate, count_tokens

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "PreparedData",
    "SampleSet",
    "add_cli",
    "collate",
    "count_tokens",
    "inspect_data",
    "inspect_data_main",
    "prepare_data",
]
