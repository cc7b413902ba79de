"""Registers LPT with peft, which has no public hook for methods defined outside its own package.

`peft.utils.register_peft_method` only accepts names already in peft's closed `PeftType` enum, so this module writes
the same three mapping entries that it would write, keyed by [`LptPeftType.LPT`] (a `str` enum that equals `"LPT"`,
the value stored in `adapter_config.json`). Importing `lpt_peft` runs it; it is idempotent.
"""

from __future__ import annotations

import os

from .config import LPTConfig, LptPeftType
from .model import LPTModel

_MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def register_lpt() -> None:
    """Make peft's `get_peft_model`, `PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know "LPT"."""
    import peft.mapping

    missing = [name for name in _MAPPINGS if not isinstance(getattr(peft.mapping, name, None), dict)]
    if missing:
        raise ImportError(
            f"lpt_peft cannot register with this peft version ({peft.__version__}): peft.mapping has no {missing}. "
            "Install the supported version: pip install 'peft>=0.21,<0.22'."
        )
    peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LptPeftType.LPT] = LPTConfig
    peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[LptPeftType.LPT] = LPTModel
    peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LptPeftType.LPT] = LPTModel.prefix
    _install_model_card_section()


def _install_model_card_section() -> None:
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_lpt_wrapped", False):
        return

    # peft writes the card from PeftModel, which a tuner cannot extend; add LPT's section only for LPT models.
    def create_or_update_model_card(self, output_dir: str) -> None:
        original(self, output_dir)
        if isinstance(self.base_model, LPTModel):
            from .model_card import add_lpt_section

            add_lpt_section(self, os.path.join(output_dir, "README.md"))
            # The evaluation preprocessing travels with the adapter (save_pretrained and push_to_hub both pass here),
            # so `lpt_peft.inference.load_classifier` feeds images the way the adapter was trained.
            preprocessing = (getattr(self.base_model, "card_info", None) or {}).get("preprocessing")
            if preprocessing:
                from .inference import save_preprocessing

                save_preprocessing(output_dir, **preprocessing)

    create_or_update_model_card._lpt_wrapped = True
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card

    # transformers' push_to_hub replaces the README written by save_pretrained with the Hub repo's card (or a blank
    # template) just before uploading; merge the LPT section back into that card so pushed repos keep it.
    original_upload = PeftModel._upload_modified_files

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if isinstance(self.base_model, LPTModel):
            self.create_or_update_model_card(working_dir)
        return original_upload(self, working_dir, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files
