"""Offline medical data -> datasets, user data formats, the Baichuan-M1 chat template, tokenizer."""

from m1_align.data.build import (
    EVAL_SPLITS,
    SPLITS,
    TRAIN_SPLITS,
    LeakError,
    build_datasets,
    build_from_config,
    check_disjoint,
    corpus_texts,
    load_split,
    read_manifest,
    show,
)
from m1_align.data.chat import BAICHUAN_CHAT_TEMPLATE, DEFAULT_SYSTEM, apply_chat_template, encode_chat
from m1_align.data.sources import (
    MissingSourceError,
    read_abbreviations,
    read_elixhauser,
    read_hpo_diseases,
    read_hpo_terms,
    read_icd10cm,
    read_mmlu_medical,
)
from m1_align.data.tasks import ANSWER_DELIMITER, SYSTEM_PROMPT, TASKS
from m1_align.data.tokenizer import train_tokenizer
from m1_align.data.user_data import DataError, load_user_data

__all__ = [
    "ANSWER_DELIMITER",
    "BAICHUAN_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM",
    "EVAL_SPLITS",
    "SPLITS",
    "SYSTEM_PROMPT",
    "TASKS",
    "TRAIN_SPLITS",
    "DataError",
    "LeakError",
    "MissingSourceError",
    "apply_chat_template",
    "build_datasets",
    "build_from_config",
    "check_disjoint",
    "corpus_texts",
    "encode_chat",
    "load_split",
    "load_user_data",
    "read_abbreviations",
    "read_elixhauser",
    "read_hpo_diseases",
    "read_hpo_terms",
    "read_icd10cm",
    "read_manifest",
    "read_mmlu_medical",
    "show",
    "train_tokenizer",
]
