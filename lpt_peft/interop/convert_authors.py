"""Kept importable for code written before the split: the timm converter now lives in [`lpt_peft.interop.timm`],
the LPT authors' checkpoint converter in [`lpt_peft.interop.authors`]. Import from those modules in new code.
"""

from lpt_peft.interop.authors import (
    AUTHORS_PHASE1_KEYS,
    AUTHORS_POOL_KEYS,
    AUTHORS_PROMPT_KEYS,
    ConvertedCheckpoint,
    authors_state_dict_to_lpt,
    convert_authors_checkpoint,
    load_authors_checkpoint,
    read_labels_file,
)
from lpt_peft.interop.timm import infer_vit_config, strip_wrapper_prefixes, timm_vit_to_hf

__all__ = [
    "AUTHORS_PHASE1_KEYS",
    "AUTHORS_POOL_KEYS",
    "AUTHORS_PROMPT_KEYS",
    "ConvertedCheckpoint",
    "authors_state_dict_to_lpt",
    "convert_authors_checkpoint",
    "infer_vit_config",
    "load_authors_checkpoint",
    "read_labels_file",
    "strip_wrapper_prefixes",
    "timm_vit_to_hf",
]
