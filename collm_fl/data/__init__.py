"""Training data for federated fine-tuning: Shakespeare's plays or user files, split across clients.

`load_client_data` / `load_central_heldout` give each client its samples and the server its
held-out set; `collm_fl.data.tokenize` (imported on its own: it needs torch) turns samples
into training batches.
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
from collm_fl.data.types import ChatRecord, ClientData, Record, TextSample

__all__ = [
    "PARTITIONINGS",
    "ChatRecord",
    "ClientData",
    "DataSpec",
    "Record",
    "TextSample",
    "format_records",
    "load_central_heldout",
    "load_client_data",
    "load_plays",
    "load_records",
    "parse_play",
    "play_files",
    "speech_samples",
]
