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
    import inspect

    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_lpt_wrapped", False):
        return

    def write_lpt_files(model, output_dir: str, adapter_name: str) -> None:
        from .model_card import _card_info, add_lpt_section

        add_lpt_section(model, os.path.join(output_dir, "README.md"), adapter_name=adapter_name)
        # The evaluation preprocessing travels with the adapter (save_pretrained and push_to_hub both pass here),
        # so `lpt_peft.inference.load_classifier` feeds images the way the adapter was trained.
        preprocessing = _card_info(model.base_model, adapter_name).get("preprocessing")
        if preprocessing:
            from .inference import save_preprocessing

            save_preprocessing(output_dir, **preprocessing)

    # peft writes one card, for the active adapter, into the top folder, which holds the "default" adapter only;
    # other adapters are saved into subfolders without a card. Each folder gets the card of the adapter it holds.
    def create_or_update_model_card(self, output_dir: str) -> None:
        original(self, output_dir)
        if isinstance(self.base_model, LPTModel):
            stored = getattr(self, "_lpt_adapters_saving", None)
            if stored is None:  # push_to_hub's refresh: the folder holds what save_pretrained put there
                stored = ["default"] if "default" in self.peft_config else [self.active_adapter]
            if "default" in stored:
                write_lpt_files(self, output_dir, "default")

    create_or_update_model_card._lpt_wrapped = True
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card

    original_save = PeftModel.save_pretrained
    save_signature = inspect.signature(original_save)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not isinstance(self.base_model, LPTModel):
            return original_save(self, save_directory, *args, **kwargs)
        call = save_signature.bind(self, save_directory, *args, **kwargs)
        bound = call.arguments
        if bound.get("save_embedding_layers", "auto") == "auto":
            # LPT adds no token embeddings; "auto" would look the base's config.json up on the Hub (a network call
            # for "demo" or any Hub-id-like base) only to learn that.
            bound["save_embedding_layers"] = False
        selected = list(bound.get("selected_adapters") or self.peft_config)
        self._lpt_adapters_saving = selected
        try:
            result = original_save(*call.args, **call.kwargs)
        finally:
            del self._lpt_adapters_saving
        if bound.get("is_main_process", True):
            for name in selected:
                if name != "default":
                    folder = os.path.join(os.fspath(save_directory), name)
                    original(self, folder)
                    write_lpt_files(self, folder, name)
        return result

    save_pretrained.__doc__ = original_save.__doc__
    PeftModel.save_pretrained = save_pretrained

    # transformers' push_to_hub replaces the README written by save_pretrained with the Hub repo's card (or a blank
    # template) just before uploading; merge the LPT section back into that card so pushed repos keep it.
    original_upload = PeftModel._upload_modified_files

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if isinstance(self.base_model, LPTModel):
            self.create_or_update_model_card(working_dir)
        return original_upload(self, working_dir, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files
