"""Input data: BEIR datasets and training records, validated with file:line errors."""

from distributed_ir.data.beir import BeirDataset, load_beir, load_corpus, load_qrels, load_queries
from distributed_ir.data.errors import DataError
from distributed_ir.data.records import (
    ScoredRecord,
    TrainRecord,
    read_records,
    write_records,
)

__all__ = [
    "BeirDataset",
    "DataError",
    "ScoredRecord",
    "TrainRecord",
    "load_beir",
    "load_corpus",
    "load_qrels",
    "load_queries",
    "read_records",
    "write_records",
]
