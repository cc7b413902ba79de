"""Registers LPT with peft, which has no public hook for methods defined outside its own package.

`peft.utils.register_peft_method` only accepts names already in peft's closed `PeftType` enum, so this module writes
the same three mapping entries that it would write, keyed by [`LPTPeftType.LPT`] (a `str` enum that equals `"LPT"`,
the value stored in `adapter_config.json`). Importing `lpt_peft` runs it; it is idempotent.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
import shutil
import tempfile

from lpt_peft.tuner.config import LPTConfig, LPTPeftType
from lpt_peft.tuner.model import LPTModel, check_adapter_names, check_injection, expected_adapter_shapes

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
    peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LPTPeftType.LPT] = LPTConfig
    peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[LPTPeftType.LPT] = LPTModel
    peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LPTPeftType.LPT] = LPTModel.prefix
    _install_model_card_section()
    _install_strict_loading_and_atomic_saving()


def _install_model_card_section() -> None:
    import inspect

    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_lpt_wrapped", False):
        return

    def write_lpt_files(model, output_dir: str, adapter_name: str) -> None:
        from lpt_peft.evaluation.model_card import _card_info, add_lpt_section

        add_lpt_section(model, os.path.join(output_dir, "README.md"), adapter_name=adapter_name)
        # The evaluation preprocessing travels with the adapter (save_pretrained and push_to_hub both pass here),
        # so `lpt_peft.inference.load_classifier` feeds images the way the adapter was trained.
        preprocessing = _card_info(model.base_model, adapter_name).get("preprocessing")
        if preprocessing:
            from lpt_peft.inference import save_preprocessing

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


# ---------------------------------------------------------------------- strict loading, atomic saving
# peft's PeftModel.from_pretrained / load_adapter inject the adapter into the base before they read its weights, accept
# a file that lacks tensors with only a warning (leaving e.g. a random cosine head), and save_pretrained writes the
# adapter file in place. These wrappers act only for LPT models: they check the config, the base and the weights file
# before peft changes anything, and make saving atomic.
_CONFIG_NAME = "adapter_config.json"
_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def _install_strict_loading_and_atomic_saving() -> None:
    from peft import PeftModel

    if getattr(PeftModel.load_adapter, "_lpt_wrapped", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter
    original_save_pretrained = PeftModel.save_pretrained
    original_set_adapter = PeftModel.set_adapter

    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, **kwargs):
        if isinstance(config, LPTConfig) or (config is None and _is_lpt_base(model)):
            key_mapping = kwargs.get("key_mapping")
            if key_mapping is None:
                key_mapping = getattr(model, "_checkpoint_conversion_mapping", {})
            check_adapter_before_loading(model, model_id, adapter_name, config, {}, key_mapping, kwargs)
        return original_from_pretrained(
            cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        if isinstance(self.base_model, LPTModel):
            bound = inspect.signature(original_load_adapter).bind(self, model_id, adapter_name, *args, **kwargs)
            tuner = self.base_model
            config = tuner.peft_config.get(adapter_name)
            key_mapping = bound.arguments.get("key_mapping")
            extra = bound.arguments.get("kwargs", {})
            check_adapter_before_loading(
                tuner.model, model_id, adapter_name, config, tuner.peft_config, key_mapping, extra
            )
        return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        bound = inspect.signature(original_save_pretrained).bind(self, save_directory, *args, **kwargs)
        main = bound.arguments.get("is_main_process", True)
        if not isinstance(self.base_model, LPTModel) or not main or os.path.isfile(save_directory):
            return original_save_pretrained(self, save_directory, *args, **kwargs)
        return _save_atomically(original_save_pretrained, self, save_directory, args, kwargs)

    def set_adapter(self, adapter_name, *args, **kwargs):
        if isinstance(self.base_model, LPTModel):
            # PeftModel records the new active adapter before its tuner can object; check first.
            check_adapter_names(adapter_name, self.peft_config)
            if isinstance(adapter_name, (list, tuple)):
                adapter_name = adapter_name[0]
        return original_set_adapter(self, adapter_name, *args, **kwargs)

    for name, wrapper, original in (
        ("load_adapter", load_adapter, original_load_adapter),
        ("save_pretrained", save_pretrained, original_save_pretrained),
        ("set_adapter", set_adapter, original_set_adapter),
        ("from_pretrained", from_pretrained, original_from_pretrained),
    ):
        wrapper._lpt_wrapped = True
        wrapper.__doc__ = original.__doc__
        wrapper.__wrapped__ = original
        setattr(PeftModel, name, classmethod(wrapper) if name == "from_pretrained" else wrapper)


def _is_lpt_base(model) -> bool:
    from lpt_peft.tuner.architectures import supported_model_classes

    return type(model).__name__ in supported_model_classes()


def check_adapter_before_loading(model, model_id, adapter_name, config, peft_config, key_mapping, kwargs) -> None:
    """Everything loading the adapter at `model_id` into `model` needs, checked before anything changes.

    The config (read from `model_id` unless given, or the existing adapter's when `adapter_name` is loaded again) must
    fit the base ([`~tuner.model.check_injection`]: not already wrapped elsewhere, same backbone fingerprint, ...),
    and the weights file must hold exactly the tensors that adapter has, with their shapes.

    Raises:
        FileNotFoundError: a local adapter folder, its `adapter_config.json` or its weights file is missing.
        OSError: a file cannot be read (damaged, truncated); the message names it.
        ValueError: the base does not match, or tensors are missing, unexpected or of the wrong shape.
    """
    from peft import PeftModel

    hub_kwargs, _ = PeftModel._split_kwargs(dict(kwargs))
    if config is None:
        config = _read_config(model_id, hub_kwargs)
        if config is None:  # not an LPT adapter (peft combines or refuses it on its own)
            return
        check_injection(model, config, adapter_name, peft_config)
    elif adapter_name not in peft_config:
        check_injection(model, config, adapter_name, peft_config)
    weights, source = _read_weights(model_id, hub_kwargs, key_mapping)
    check_adapter_weights(weights, expected_adapter_shapes(model, config), source)


def _adapter_folder(model_id, hub_kwargs) -> str | None:
    """The local folder of the adapter, None for a Hub id; a clearly local path that does not exist is an error."""
    path = os.fspath(model_id)
    subfolder = hub_kwargs.get("subfolder")
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(folder):
        return folder
    looks_local = os.path.isabs(path) or path.startswith(("~", "./", "../", ".\\")) or path.count("/") > 1
    if os.path.isdir(path) or looks_local:
        raise FileNotFoundError(
            f"The adapter folder {folder} does not exist. Pass the folder written by `save_pretrained` (or a Hub "
            "repo id such as 'user/lpt-adapter')."
        )
    return None


def _listing(folder: str) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        return f"(cannot list it: {err.strerror})"
    return f"it holds {names}" if names else "it is empty"


def _read_config(model_id, hub_kwargs) -> LPTConfig | None:
    folder = _adapter_folder(model_id, hub_kwargs)
    if folder is None:
        from peft import PeftConfig

        try:
            is_lpt = PeftConfig._get_peft_type(model_id, **hub_kwargs) == LPTPeftType.LPT
        except Exception:  # unreachable Hub repo: peft raises its own error next
            return None
        return LPTConfig.from_pretrained(model_id, **hub_kwargs) if is_lpt else None
    path = os.path.join(folder, _CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{_CONFIG_NAME} is missing in the adapter folder {folder} ({_listing(folder)}). Pass the folder written "
            "by `PeftModel.save_pretrained`, or copy the whole folder again."
        )
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as err:
        raise OSError(f"Could not read the adapter config {path}: {err}. The file is damaged; save it again.") from err
    if not isinstance(data, dict) or data.get("peft_type") != LPTPeftType.LPT:
        return None
    return LPTConfig.from_pretrained(folder)


def _read_weights(model_id, hub_kwargs, key_mapping) -> tuple[dict, str]:
    from peft.utils import load_peft_weights

    folder = _adapter_folder(model_id, hub_kwargs)
    if folder is None:
        return load_peft_weights(model_id, device="cpu", key_mapping=key_mapping, **hub_kwargs), os.fspath(model_id)
    present = [name for name in _WEIGHTS_NAMES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise FileNotFoundError(
            f"{_WEIGHTS_NAMES[0]} is missing in the adapter folder {folder} (nor is there an {_WEIGHTS_NAMES[1]}); "
            f"{_listing(folder)}. The save that wrote it did not finish, or the weights were not copied with "
            f"{_CONFIG_NAME}: save or copy the adapter again."
        )
    source = os.path.join(folder, present[0])
    kwargs = {key: value for key, value in hub_kwargs.items() if key != "subfolder"}
    try:
        return load_peft_weights(folder, device="cpu", key_mapping=key_mapping, **kwargs), source
    except Exception as err:
        raise OSError(
            f"Could not read the LPT adapter weights {source}: {type(err).__name__}: {err}. The file is damaged or "
            "incomplete (an interrupted save, copy or download): save or download the adapter again."
        ) from err


def _layout_mismatch(missing: list[str], unexpected: list[str]) -> str | None:
    """'file X..., base Y...' when the missing and unexpected keys are the same tensors under another module prefix."""

    def split(key: str) -> tuple[str, str]:
        # The adapter's own tensors live in the transformer layers ("[encoder.]layer(s).<i>...") or on the tuner.
        match = re.search(r"(?:^|\.)((?:encoder\.)?(?:layers?|blocks)\.\d+\..*)$", key)
        return (key[: match.start(1)], match.group(1)) if match else ("", key)

    if not missing or len(missing) != len(unexpected):
        return None
    base = {split(k)[1]: split(k)[0] for k in missing}
    saved = {split(k)[1]: split(k)[0] for k in unexpected}
    if set(base) != set(saved):
        return None
    key = sorted(base)[0]
    return f"file {saved[key] + key!r}, this base {base[key] + key!r}"


def check_adapter_weights(weights: dict, expected: dict, source: str) -> None:
    """Raise a ValueError naming every missing, unexpected or wrongly shaped tensor of an LPT adapter file.

    Args:
        weights: The state dict read from the file (peft's saved keys).
        expected: [`~lpt_peft.tuner.model.expected_adapter_shapes`] of the adapter it is loaded into.
        source: The file, for the message.
    """
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{key} (file {tuple(weights[key].shape)}, adapter {expected[key]})"
        for key in sorted(expected)
        if key in weights and tuple(weights[key].shape) != tuple(expected[key])
    ]
    problems = [
        f"{what} {items}"
        for what, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong))
        if items
    ]
    layout = _layout_mismatch(missing, unexpected)
    if layout:
        raise ValueError(
            f"The LPT adapter weights {source} were saved from a model whose backbone sits at another place "
            f"({layout}): the adapter was trained on a different model class than this base (e.g. ViTModel vs "
            "ViTForImageClassification, whose ViT is `.vit`). Load it onto the class it was trained on: pass the "
            "inner backbone (e.g. `base.vit`) or load the base with that class. Nothing was loaded."
        )
    if problems:
        raise ValueError(
            f"The LPT adapter weights {source} do not match the adapter they are loaded into: {'; '.join(problems)}. "
            "Nothing was loaded (a missing tensor would otherwise stay randomly initialised, e.g. a random cosine "
            "head). Re-save the adapter from the trained model, or load it with the config and base it was saved with."
        )


def _save_atomically(original, peft_model, save_directory, args, kwargs) -> None:
    """Run peft's save into a temporary folder inside `save_directory`, then move each file into place.

    A failed write (a full disk, no permission) leaves the files already in `save_directory` untouched, and its error
    names the folder, the file when known, and the cause.
    """
    target = os.fspath(save_directory)
    staging = None
    try:
        os.makedirs(target, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".lpt-saving-", dir=target)
        card = os.path.join(target, "README.md")
        if os.path.isfile(card):  # peft updates an existing model card rather than replacing it
            shutil.copy2(card, staging)
        original(peft_model, staging, *args, **kwargs)
        for root, _, files in os.walk(staging):
            destination = os.path.join(target, os.path.relpath(root, staging))
            os.makedirs(destination, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(destination, name))
    except Exception as err:
        if not _is_write_failure(err):
            raise
        raise _save_error(err, target, staging) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# How the writers report a failed write, e.g. a full disk: torch.save's C++ stream raises RuntimeErrors such as
# "basic_ios::clear: iostream error" or "[enforce fail at inline_container.cc] . unexpected pos"; safetensors raises
# its own SafetensorError ("... No space left on device (os error 28)").
_WRITE_FAILURE_WORDS = (
    "iostream", "StreamWriter", "inline_container", "unexpected pos", "write", "No space", "os error"
)  # fmt: skip


def _is_write_failure(err: Exception) -> bool:
    if isinstance(err, OSError):
        return True
    if type(err).__name__ == "SafetensorError" or isinstance(err, RuntimeError):
        return any(word in str(err) for word in _WRITE_FAILURE_WORDS)
    return False


def _save_error(err: Exception, target: str, staging: str | None) -> OSError:
    filename = getattr(err, "filename", None)
    if filename and staging:
        filename = os.fspath(filename).replace(staging, target)
    cause = getattr(err, "strerror", None) or str(err)
    code = getattr(err, "errno", None)
    if code is None and ("No space left" in str(err) or "os error 28" in str(err)):
        code, cause = errno.ENOSPC, f"no space left on the device ({err})"
    try:
        free = shutil.disk_usage(target).free / 2**20
        space = f"; {free:.0f} MiB are free on that disk"
    except OSError:
        space = ""
    hint = "Free disk space or choose another folder" if code == errno.ENOSPC else "Check that the folder is writable"
    message = (
        f"Could not save the LPT adapter to {target}" + (f" (writing {filename})" if filename else "") + f": {cause}"
        f"{space}. The files already there were left as they were (new files are written to a temporary folder "
        f"first, then moved into place). {hint}, then save again."
    )
    return OSError(code, message) if code is not None else OSError(message)
