"""Data: loaders for the medical instruction sets, few-shot selection and client partitioning.

Re-exported here so callers depend on `fedpit.data`, not on how it is split into modules. The
heavy libraries (sentence-transformers, scikit-learn, datasets, flwr-datasets) load only when
the function that needs them is called, so importing this package stays cheap.
"""

from fedpit.data.fewshot import embed_texts, select_fewshot
from fedpit.data.partition import partition_examples
from fedpit.data.sources import (
    load_instruction_file,
    load_medinstruct_seeds,
    load_medinstruct_test,
    load_medquad,
    load_pubmedqa,
    normalise_whitespace,
    resolve_data_dir,
)

__all__ = [
    "embed_texts",
    "load_instruction_file",
    "load_medinstruct_seeds",
    "load_medinstruct_test",
    "load_medquad",
    "load_pubmedqa",
    "normalise_whitespace",
    "partition_examples",
    "resolve_data_dir",
    "select_fewshot",
]
