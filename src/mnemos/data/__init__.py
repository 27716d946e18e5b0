"""Offline, seed-deterministic data for mnemos: recall tasks, long-context tasks, language-modelling text.

Every task is a typed config whose ``build(seed)`` returns the data (Zoology's pattern); nothing is downloaded.
"""

from mnemos.data.babilong import BABILongConfig, BABILongSample, BABILongTask
from mnemos.data.capacity import PasskeyCapacityConfig, longest_length_at
from mnemos.data.corpus import builtin_corpus, filler_text, load_text
from mnemos.data.lm import LMData, LMDataConfig
from mnemos.data.mqar import (IGNORE_INDEX, MQAR_EXTRAPOLATION_GRID, MQAR_NOISE, MQAR_ZOOLOGY_GRID, MQARConfig,
                              mqar_grid)
from mnemos.data.niah import NIAHConfig, NIAHKind, NIAHQuery, NIAHSample, stack_input_ids
from mnemos.data.scoring import exact_match, exact_match_accuracy, mqar_recall_metrics
from mnemos.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe_tokenizer

__all__ = [
    "BABILongConfig",
    "BABILongSample",
    "BABILongTask",
    "BPETokenizer",
    "ByteTokenizer",
    "IGNORE_INDEX",
    "LMData",
    "LMDataConfig",
    "MQARConfig",
    "MQAR_EXTRAPOLATION_GRID",
    "MQAR_NOISE",
    "MQAR_ZOOLOGY_GRID",
    "NIAHConfig",
    "NIAHKind",
    "NIAHQuery",
    "NIAHSample",
    "PasskeyCapacityConfig",
    "Tokenizer",
    "builtin_corpus",
    "exact_match",
    "exact_match_accuracy",
    "filler_text",
    "load_text",
    "longest_length_at",
    "mqar_grid",
    "mqar_recall_metrics",
    "stack_input_ids",
    "train_bpe_tokenizer",
]
