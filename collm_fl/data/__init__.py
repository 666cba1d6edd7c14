"""Training data for federated fine-tuning: Shakespeare's plays or user files, split across clients.

`load_client_data` / `load_central_heldout` give each client its samples and the server its
held-out set; `tokenize_samples` and `iterate_batches` turn samples into training batches.
"""

from collm_fl.data.files import format_records, load_records
from collm_fl.data.partition import (
    PARTITIONINGS,
    DataSpec,
    load_central_heldout,
    load_client_data,
    speech_samples,
)
from collm_fl.data.shakespeare import load_plays, parse_play, play_files
from collm_fl.data.tokenize import IGNORE_INDEX, TokenizedBlocks, iterate_batches, tokenize_samples
from collm_fl.data.types import ChatRecord, ClientData, Record, TextSample

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONINGS",
    "ChatRecord",
    "ClientData",
    "DataSpec",
    "Record",
    "TextSample",
    "TokenizedBlocks",
    "format_records",
    "iterate_batches",
    "load_central_heldout",
    "load_client_data",
    "load_plays",
    "load_records",
    "parse_play",
    "play_files",
    "speech_samples",
    "tokenize_samples",
]
