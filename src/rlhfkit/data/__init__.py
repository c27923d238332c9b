"""Typed records, readers, format detection, chat templating, splitting and batching."""

from rlhfkit.data.errors import DataError
from rlhfkit.data.formats import Loaded, detect, load_records, parse_hh
from rlhfkit.data.readers import read_rows
from rlhfkit.data.records import (
    KINDS,
    Demonstration,
    Preference,
    PromptRecord,
    Ranking,
    Rating,
    Record,
    StepSolution,
)
from rlhfkit.data.split import split_records, train_eval_split
from rlhfkit.data.template import Encoded, encode_prompt, encode_response, pad, position_ids, truncate

__all__ = [
    "KINDS", "DataError", "Demonstration", "Encoded", "Loaded", "Preference", "PromptRecord", "Ranking",
    "Rating", "Record", "StepSolution", "detect", "encode_prompt", "encode_response", "load_records", "pad",
    "parse_hh", "position_ids", "read_rows", "split_records", "train_eval_split", "truncate",
]
