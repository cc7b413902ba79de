"""The LPT authors' checkpoint converter: their released `.pth` into a backbone folder and an LPT adapter folder.

[`convert_authors_checkpoint`] turns the authors' released checkpoint (`LPT_places.pth`, a torch pickle
`{"config": ..., "state_dict": ..., "val_acc": ...}` holding the timm-style backbone plus `prompt_learner.*`) into a
`ViTModel` folder and an LPT adapter folder: phase 2 for their full model (shared prompts, group pool, keys, head),
phase 1 for their phase-1 model (shared prompts and head, no pool), loadable with
`lpt_peft.inference.load_classifier(base_dir, adapter_dir)` or
`PeftModel.from_pretrained(ViTModel.from_pretrained(base_dir), adapter_dir)` after `import lpt_peft`. The backbone
part is mapped by the timm converter ([`lpt_peft.interop.timm`]).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpt_peft.cli import LPTUsageError
from lpt_peft.interop.timm import (
    _AUTHORS_LAYER_NORM_EPS,
    _TIMM_IGNORED,
    _build_vit,
    _check_leftovers,
    _check_shape,
    _timm_to_hf_state_dict,
    infer_vit_config,
    strip_wrapper_prefixes,
)
from lpt_peft.interop.timm import _get as _get_tensor

__all__ = [
    "AUTHORS_PHASE1_KEYS",
    "AUTHORS_POOL_KEYS",
    "AUTHORS_PROMPT_KEYS",
    "ConvertedCheckpoint",
    "authors_state_dict_to_lpt",
    "convert_authors_checkpoint",
    "load_authors_checkpoint",
    "read_labels_file",
]

AUTHORS_PROMPT_KEYS = (
    "prompt_learner.Prompt_Tokens",
    "prompt_learner.Prompt_Tokens_pool",
    "prompt_learner.Prompt_Keys",
    "prompt_learner.head.weight",
)
AUTHORS_PHASE1_KEYS = ("prompt_learner.Prompt_Tokens", "prompt_learner.head.weight")  # shared prompts + cosine head
AUTHORS_POOL_KEYS = ("prompt_learner.Prompt_Tokens_pool", "prompt_learner.Prompt_Keys")  # phase 2 adds the pool

def _get(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """`state_dict[key]`; a missing prompt-learner key gets an error that lists the authors' two layouts."""
    if key not in state_dict and key.startswith("prompt_learner."):
        found = sorted(k for k in state_dict if k.startswith("prompt_learner."))
        raise ValueError(
            f"The {what} lacks the prompt learner's key {key!r}. The authors' phase-1 model holds "
            f"{', '.join(AUTHORS_PHASE1_KEYS)}; their phase-2 model also {', '.join(AUTHORS_POOL_KEYS)}. Found: "
            f"{found or 'no prompt_learner.* keys'}."
        )
    return _get_tensor(state_dict, key, what)


def _safe_globals() -> list:
    """Harmless types found in research checkpoints beside tensors: argparse options and numpy scalars."""
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    types = [argparse.Namespace, multiarray.scalar, np.dtype]
    types += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return types


# Refusals of torch's weights-only unpickler that mean "this pickle builds Python objects beyond tensors" (torch 2.x
# `_weights_only_unpickler`: a global not allow-listed or blocked, an object it may not construct or fill).
_OBJECT_REFUSALS = ("Unsupported global", "is blocked", "Can only ", "must be imported to load")


def _damaged(path: Path, cause: BaseException) -> ValueError:
    detail = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
    if "WeightsUnpickler error:" in str(cause):  # torch's advice around the cause is about unsafe loading
        detail = str(cause).split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:200]
    return ValueError(
        f"The file is damaged or not a PyTorch checkpoint: {path} ({detail}). A torch.save file is a zip archive "
        "(or a legacy torch pickle) written in full; check that the download or copy is complete and that this is "
        "the .pth file (e.g. LPT_places.pth)."
    )


def _torch_pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of a complete `torch.save` file, or None if `path` does not have that layout.

    Read without unpickling anything: a zip archive with a `data.pkl` member (torch >= 1.6), or a legacy file that
    starts with torch's pickled magic number.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                head = archive.open(names[0]).read(2) if names else b""
            return head[1] if len(head) == 2 and head[0] == 0x80 else (1 if head else None)
        protocol = 1
        with open(path, "rb") as handle:
            for opcode, arg, _ in itertools.islice(pickletools.genops(handle), 4):
                protocol = arg if opcode.name == "PROTO" else protocol
                if opcode.name.startswith("LONG") and arg == torch.serialization.MAGIC_NUMBER:
                    return protocol
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError):
        return None
    return None


def _load_unsafe(path: Path, err: Exception, trust_pickle: bool) -> Any:
    """After the safe load failed with `err`: refuse a damaged file, explain the choice, or unpickle in full."""
    import pickle

    protocol = _torch_pickle_protocol(path)
    if protocol is None or not isinstance(err, pickle.UnpicklingError):
        raise _damaged(path, err) from err
    message = str(err)
    if any(refusal in message for refusal in _OBJECT_REFUSALS):
        found = re.search(r"GLOBAL (\S+)", message)
        detail = found.group(1) if found else message.split("WeightsUnpickler error:", 1)[-1].strip()[:200]
        reason = f"it holds Python objects beyond tensors ({detail.splitlines()[0]})"
    elif "Unsupported operand" in message and protocol > 2:
        reason = f"it was pickled with protocol {protocol}, which torch's safe loader does not read"
    else:
        raise _damaged(path, err) from err
    if not trust_pickle:
        quoted = f"{str(path)!r} cannot be loaded safely (torch.load with weights_only=True): {reason}."
        raise LPTUsageError(
            quoted.replace("{", "{{").replace("}", "}}") + " Loading it in full runs code stored in the file. If you "
            "trust its source, pass {trust_pickle}.",
            trust_pickle="trust_pickle=True",
        ) from err
    warnings.warn(
        f"Loading {str(path)!r} with torch.load(weights_only=False) ({reason}): unpickling executes code stored in "
        "the file. Do this only for files from a source you trust.",
        stacklevel=3,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as missing:  # the objects' classes are not importable here
        raise ValueError(
            f"{str(path)!r} holds objects whose code is not installed here ({missing}); install the package that "
            "defined them, or re-save the checkpoint as {'config': dict, 'state_dict': tensors} where it loads."
        ) from missing
    except Exception as broken:  # noqa: BLE001 - a complete-looking file that still does not unpickle
        raise _damaged(path, broken) from broken


def load_authors_checkpoint(
    path: str | os.PathLike, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """Load the authors' checkpoint file: returns `(state_dict, stored_config, val_acc)`.

    The file is first read with `torch.load(weights_only=True)` (tensors, plain containers, argparse namespaces and
    numpy scalars only), which cannot run code. If a complete `torch.save` file fails that load only because it
    holds other Python objects (or was pickled with a protocol the safe loader does not read), the error explains
    the choice: a full unpickle (`weights_only=False`) executes whatever code the file contains, so it only happens
    with `trust_pickle=True`, and then with a warning. A truncated, corrupt or non-torch file is reported as such,
    with or without `trust_pickle`.

    Args:
        path: The `.pth` / `.pt` file.
        trust_pickle: Allow the full (code-executing) unpickle when the safe load fails for the reason above. Only
            for files from a source you trust.

    Returns:
        `tuple`: the state dict (`{name: tensor}`, wrapper prefixes such as `module.` stripped), the stored config
        (a `dict` when it was an `argparse.Namespace`, else as stored, `None` if absent) and the stored `val_acc`.

    Raises:
        FileNotFoundError: `path` does not exist, or is a folder.
        ValueError: "damaged or not a PyTorch checkpoint: <path>" (truncated, corrupt or another kind of file); the
            file holds Python objects and `trust_pickle` is false; the full unpickle needs a module that is not
            installed; the file holds no state dict.

    Example:

    ```python
    >>> state_dict, stored_config, val_acc = load_authors_checkpoint("LPT_places.pth")
    >>> state_dict["prompt_learner.Prompt_Keys"].shape
    torch.Size([20, 768])
    ```
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} is a folder; pass the .pth file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, OSError, EOFError, ...
        checkpoint = _load_unsafe(path, err, trust_pickle)
    stored_config, val_acc = None, None
    if isinstance(checkpoint, Mapping) and any(k in checkpoint for k in ("state_dict", "model")):
        state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint["model"]
        stored_config, val_acc = checkpoint.get("config"), checkpoint.get("val_acc")
    else:
        state_dict = checkpoint  # a bare state dict
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict: expected {{'config': ..., 'state_dict': {{name: tensor}}, "
            f"'val_acc': ...}} or a bare {{name: tensor}} dict, got {type(checkpoint).__name__} with keys "
            f"{list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else 'none'}."
        )
    if isinstance(stored_config, argparse.Namespace):
        stored_config = vars(stored_config)
    return strip_wrapper_prefixes(state_dict), stored_config, val_acc


def read_labels_file(path: str | os.PathLike) -> dict[int, str]:
    """Read class names into `{index: name}` from one of three formats.

    - one name per line; the line order is the class index;
    - `name index` lines, such as Places365's `categories_places365.txt` (`/a/airfield 0`);
    - a split file of `relative/path index` lines, such as `Places_LT_train.txt` (`train/airfield/0001.jpg 0`): the
      name of a class is the folder its images sit in.

    Example:

    ```python
    >>> read_labels_file("shared/data/places_lt/Places_LT_train.txt")[0]
    'airfield'
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Labels file {str(path)!r} does not exist.")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    parts = [line.rsplit(maxsplit=1) for line in lines]
    if not parts or not all(len(p) == 2 and p[1].isdigit() for p in parts):
        return dict(enumerate(lines))
    names: dict[int, set[str]] = {}
    for name, index in parts:
        names.setdefault(int(index), set()).add(name)
    if any(len(v) > 1 for v in names.values()):
        # A split file: many images per class; the class is the image's folder.
        names = {i: {Path(n).parent.name for n in v} for i, v in names.items()}
        clash = {i: sorted(v) for i, v in names.items() if len(v) > 1}
        if clash:
            raise ValueError(
                f"{str(path)!r} gives class {next(iter(clash))} several names {next(iter(clash.values()))[:3]}; pass "
                "a file with one name per class."
            )
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{str(path)!r} does not number its classes 0..{len(names) - 1} without gaps.")
    return {i: next(iter(v)) for i, v in sorted(names.items())}

@dataclass
class _AuthorsParts:
    vit: Any  # the converted ViTModel, not yet wrapped
    shared: torch.Tensor  # (L, P, D)
    head: torch.Tensor  # (D, C)
    pool: torch.Tensor | None = None  # (m, L - K, Pg, D); None in the authors' phase-1 model
    keys: torch.Tensor | None = None  # (m, D); None in the authors' phase-1 model

    @property
    def phase(self) -> int:
        return 1 if self.pool is None else 2

    @property
    def shared_layers(self) -> int | None:
        return None if self.pool is None else self.shared.shape[0] - self.pool.shape[1]


def _check_prompt_shapes(shared, head, pool, keys, d: int, depth: int) -> None:
    if shared.dim() != 3 or tuple(shared.shape[::2]) != (depth, d):
        raise ValueError(
            f"Unexpected shape for 'prompt_learner.Prompt_Tokens': got {list(shared.shape)}, expected "
            f"[{depth} (one row per layer), prompts, {d}]."
        )
    if head.dim() != 2 or head.shape[0] != d or head.shape[1] < 2:
        raise ValueError(
            f"Unexpected shape for 'prompt_learner.head.weight': got {list(head.shape)}, expected [{d}, classes] "
            "(the authors' cosine classifier stores classes as columns)."
        )
    if pool is None:
        return
    if pool.dim() != 4 or pool.shape[-1] != d or not 1 <= pool.shape[1] <= depth:
        raise ValueError(
            f"Unexpected shape for 'prompt_learner.Prompt_Tokens_pool': got {list(pool.shape)}, expected "
            f"[groups, layers with group prompts (1..{depth}), prompts, {d}]."
        )
    _check_shape("prompt_learner.Prompt_Keys", keys, (pool.shape[0], d), "one key per prompt group")


def _parse_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None, strict: bool, attn_implementation: str
) -> _AuthorsParts:
    state_dict = strip_wrapper_prefixes(state_dict)
    what = "authors' checkpoint"
    config = infer_vit_config(state_dict, num_attention_heads=num_attention_heads)
    shared = _get(state_dict, "prompt_learner.Prompt_Tokens", what)
    head = _get(state_dict, "prompt_learner.head.weight", what)
    present = [key for key in AUTHORS_POOL_KEYS if key in state_dict]
    if len(present) == 1:  # half a pool: neither of the authors' layouts
        missing = next(key for key in AUTHORS_POOL_KEYS if key not in state_dict)
        _get(state_dict, missing, what)
    pool, keys = (_get(state_dict, key, what) for key in AUTHORS_POOL_KEYS) if present else (None, None)
    _check_prompt_shapes(shared, head, pool, keys, config.hidden_size, config.num_hidden_layers)
    hf_state, used = _timm_to_hf_state_dict(state_dict, config)
    used |= set(AUTHORS_PROMPT_KEYS)
    leftover = sorted(k for k in state_dict if k not in used and not _TIMM_IGNORED.fullmatch(k))
    expected = "Expected the timm ViT keys plus " + ", ".join(AUTHORS_PHASE1_KEYS) + " (phase 1), and "
    _check_leftovers(leftover, strict, what, expected + ", ".join(AUTHORS_POOL_KEYS) + " (phase 2).")
    vit = _build_vit(config, hf_state, attn_implementation)
    tensors = [None if t is None else t.detach().to(torch.float32) for t in (shared, head, pool, keys)]
    return _AuthorsParts(vit, *tensors)


def _authors_lpt_config(
    parts: _AuthorsParts, top_k: int, id2label: Mapping[int, str] | None, pool_options: Mapping[str, int | None]
):
    """The adapter config; for a phase-1 model the pool sizes are those phase-2 training will start from."""
    from lpt_peft.tuner.config import LPTConfig

    depth = parts.shared.shape[0]
    if parts.pool is not None:
        num_groups, _, group_length, _ = parts.pool.shape
        sizes = {"num_groups": int(num_groups), "group_prompt_length": int(group_length)}
        sizes["shared_layers"] = parts.shared_layers
    else:
        sizes = {"num_groups": 20, "group_prompt_length": 10, "shared_layers": depth // 2}  # the paper's (6 of 12)
        sizes.update({k: v for k, v in pool_options.items() if v is not None})
    return LPTConfig(
        num_labels=int(parts.head.shape[1]),
        prompt_length=int(parts.shared.shape[1]),
        top_k=top_k,
        layer_norm_eps=_AUTHORS_LAYER_NORM_EPS,
        id2label=dict(id2label) if id2label is not None else None,
        phase=parts.phase,
        num_hidden_layers=depth,
        hidden_size=int(parts.shared.shape[2]),
        **sizes,
    )


def _wrap_authors_parts(parts: _AuthorsParts, lpt_config, base_model_name_or_path: str | None):
    from peft import get_peft_model

    if base_model_name_or_path:
        # get_peft_model records the base model's own name in the adapter config (and warns if they differ).
        parts.vit.name_or_path = base_model_name_or_path
        parts.vit.config._name_or_path = base_model_name_or_path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a phase-1 file has no pool: its freshly initialised pool is the same on every run
        model = get_peft_model(parts.vit, lpt_config)
    adapter = model.active_adapter
    prefix = "base_model.model.layers"
    weights = {f"base_model.lpt_head.{adapter}": parts.head}
    if parts.keys is not None:
        weights[f"base_model.lpt_keys.{adapter}"] = parts.keys
    for i in range(parts.shared.shape[0]):
        weights[f"{prefix}.{i}.attention.lpt_shared_prompt.{adapter}"] = parts.shared[i]
        if parts.pool is not None and i >= parts.shared_layers:
            weights[f"{prefix}.{i}.attention.lpt_group_prompt.{adapter}"] = parts.pool[:, i - parts.shared_layers]
    result = model.load_state_dict({k: v.contiguous() for k, v in weights.items()}, strict=False)
    not_filled = [k for k in result.missing_keys if ".lpt_" in k]
    if parts.pool is None:  # the pool of a phase-1 model is not in the file: it stays at its initialisation
        not_filled = [k for k in not_filled if ".lpt_group_prompt." not in k and ".lpt_keys." not in k]
    if result.unexpected_keys or not_filled:
        raise RuntimeError(
            f"Internal mapping error (the LPT adapter layout changed?): unexpected {result.unexpected_keys[:4]}, "
            f"not filled {not_filled[:4]}."
        )
    model.base_model.set_phase(parts.phase)
    return model.eval()


def authors_state_dict_to_lpt(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    top_k: int = 2,
    id2label: Mapping[int, str] | None = None,
    strict: bool = True,
    base_model_name_or_path: str | None = None,
    attn_implementation: str = "sdpa",
    shared_layers: int | None = None,
    num_groups: int | None = None,
    group_prompt_length: int | None = None,
):
    """Build the LPT `PeftModel` equal to the authors' model from their state dict (in memory).

    Shapes give everything: `Prompt_Tokens` `(L, P, D)` holds the shared prompts of layer i at `[i]` (0-based);
    `Prompt_Tokens_pool` `(m, L - K, Pg, D)` holds the group prompts of layers K+1..L (1-based), layer i (0-based,
    i >= K) at `[:, i - K]` (so K = L - its second dimension); `Prompt_Keys` `(m, D)`; `head.weight` `(D, C)` is the
    cosine classifier with classes as columns. The authors' phase-1 model has no pool and no keys: it becomes a
    phase-1 adapter whose pool (sized by `shared_layers` / `num_groups` / `group_prompt_length`) is freshly
    initialised, ready for phase-2 training (`examples/train_lpt.py --phase 2 --init_from <adapter>`).

    Args:
        state_dict: The authors' state dict (`module.` prefixes allowed).
        num_attention_heads: Heads per layer (default `D // 64`).
        top_k: Groups selected per image (the authors use 2).
        id2label: Class names `{index: name}`; default `"0"`, `"1"`, ...
        strict: Raise on keys that are neither backbone nor prompt weights.
        base_model_name_or_path: Recorded in the adapter config (where the converted base will live).
        attn_implementation: `"sdpa"` or `"eager"`.
        shared_layers / num_groups / group_prompt_length: Phase-1 models only (a phase-2 file fixes them): the
            pool phase 2 will train. Default: the paper's, `L // 2`, 20 and 10.

    Returns:
        The `PeftModel` (eval mode, in the checkpoint's phase) around the converted `ViTModel`.

    Raises:
        ValueError: a missing key or a wrong shape (named), unknown keys with `strict=True`, or pool options for a
            phase-2 file.

    Example:

    ```python
    >>> state_dict, _, _ = load_authors_checkpoint("LPT_places.pth")
    >>> model = authors_state_dict_to_lpt(state_dict)
    >>> model(pixel_values=pixel_values).logits.shape
    torch.Size([8, 365])
    ```
    """
    pool_options = dict(shared_layers=shared_layers, num_groups=num_groups, group_prompt_length=group_prompt_length)
    parts = _parse_authors_state_dict(state_dict, num_attention_heads, strict, attn_implementation)
    lpt_config = _checked_lpt_config(parts, top_k, id2label, pool_options)
    return _wrap_authors_parts(parts, lpt_config, base_model_name_or_path)


def _checked_lpt_config(parts: _AuthorsParts, top_k: int, id2label, pool_options: Mapping[str, int | None]):
    given = [name for name, value in pool_options.items() if value is not None]
    if parts.pool is not None and given:
        raise LPTUsageError(
            "This is the authors' phase-2 model: its pool fixes the group sizes and K, so "
            + ", ".join(f"{{{name}}}" for name in given)
            + " cannot be set. Leave them out.",
            *given,
        )
    return _authors_lpt_config(parts, top_k, id2label, pool_options)


@dataclass
class ConvertedCheckpoint:
    """What [`convert_authors_checkpoint`] wrote.

    Args:
        model: The `PeftModel` (already in memory; equal to what the two folders load).
        base_dir / adapter_dir: The written folders.
        stored_config: The `config` entry of the checkpoint (a dict; None when absent).
        val_acc: The `val_acc` entry of the checkpoint (None when absent).
        phase: 2 for the authors' full model, 1 for their phase-1 model (no group pool).
    """

    model: Any
    base_dir: Path
    adapter_dir: Path
    stored_config: Any
    val_acc: Any
    phase: int = 2


def _stored_top_k(stored_config: Any) -> int | None:
    if isinstance(stored_config, Mapping):
        for key in ("topk", "top_k"):
            value = stored_config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_output_dirs(checkpoint: Path, base_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Refuse output folders that would destroy each other or the input, before anything is written.

    Replacing a folder replaces everything inside it, so the two folders must be apart (neither inside the other)
    and neither may hold the checkpoint being converted; a non-empty folder is replaced only with `overwrite`.
    """
    base, adapter, source = base_dir.resolve(), adapter_dir.resolve(), checkpoint.resolve()
    if base == adapter:
        raise LPTUsageError(f"The base and adapter folders are the same ({str(base_dir)!r}); give two folders.")
    pairs = ((adapter, base, "adapter", "base"), (base, adapter, "base", "adapter"))
    for inner, outer, inner_name, outer_name in pairs:
        if _within(inner, outer):
            raise LPTUsageError(
                f"The {inner_name} folder {str(inner)!r} is inside the {outer_name} folder {str(outer)!r}: writing "
                f"the {outer_name} folder would replace it. Give two separate folders (e.g. <dir>/base and "
                "<dir>/adapter); nothing was written."
            )
    for folder, resolved in ((base_dir, base), (adapter_dir, adapter)):
        if _within(source, resolved):
            raise LPTUsageError(
                f"The output folder {str(folder)!r} holds the checkpoint being converted ({str(checkpoint)!r}); "
                "writing it would delete the checkpoint. Choose an output folder that does not contain it; nothing "
                "was written."
            )
    for folder in (base_dir, adapter_dir):
        if folder.exists() and not folder.is_dir():
            raise LPTUsageError(f"{str(folder)!r} is a file, not a folder; choose another output folder.")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise LPTUsageError(
                f"{str(folder)!r} exists and is not empty; nothing was written. Choose another output folder, or "
                "pass {overwrite} to replace it.",
                "overwrite",
            )


def _fresh_sibling(target: Path, tag: str) -> Path:
    """A new empty folder beside `target` whose name no existing file or folder has (never a user's `x.old`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:  # mkdir (not mkdtemp) so the folder gets the usual permissions once it is renamed into place
        folder = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder


def _swap_in(staged: Path, target: Path) -> None:
    """Replace `target` by the finished folder `staged` (renames only, so a reader never sees half a folder)."""
    if target.exists():
        old = _fresh_sibling(target, "old")
        old.rmdir()  # os.replace needs a free name
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


def _missing_parents(folders) -> list[Path]:
    """The folders above `folders` that do not exist yet, deepest first (removed again if the conversion fails)."""
    missing = {parent for folder in folders for parent in folder.resolve().parents if not parent.exists()}
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def convert_authors_checkpoint(
    checkpoint: str | os.PathLike,
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    num_attention_heads: int | None = None,
    top_k: int | None = None,
    id2label: Mapping[int, str] | None = None,
    dataset: str | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    shared_layers: int | None = None,
    num_groups: int | None = None,
    group_prompt_length: int | None = None,
) -> ConvertedCheckpoint:
    """Convert an LPT authors' checkpoint (e.g. their released `LPT_places.pth`) into a `ViTModel` folder and an LPT
    adapter folder: phase 2 for their full model, phase 1 for their phase-1 model (shared prompts and head, no pool).

    Both folders also get a `preprocessor_config.json` with the authors' evaluation preprocessing (resize to
    `image_size * 256 / 224` square, centre crop `image_size`, mean = std = 0.5), which
    [`lpt_peft.inference.load_classifier`] and `AutoImageProcessor` read. Everything is read and checked before
    anything is written; the folders are written next to their targets and renamed into place at the end, so an
    error leaves no half-converted folder.

    Args:
        checkpoint: The authors' `.pth` file (`{"config", "state_dict", "val_acc"}`; `module.` prefixes allowed).
        base_dir: Output folder of the backbone (`ViTModel.save_pretrained`).
        adapter_dir: Output folder of the adapter (`PeftModel.save_pretrained`).
        num_attention_heads: Heads per layer (default `D // 64`).
        top_k: Groups per image; default: the checkpoint's `config["topk"]` if present, else 2.
        id2label: Class names `{index: name}` (see [`read_labels_file`]).
        dataset: Data set name for the model card (e.g. `"places_lt"`).
        trust_pickle: See [`load_authors_checkpoint`].
        strict: Raise on unknown keys.
        base_model_name_or_path: What the adapter records as its base (default: the absolute path of `base_dir`).
            Set it to the Hub id if you will upload the converted base there.
        overwrite: Replace non-empty output folders (default: refuse, so nothing is lost by a typo). Folders inside
            one another or holding `checkpoint` are refused even so.
        shared_layers / num_groups / group_prompt_length: Phase-1 files only; see [`authors_state_dict_to_lpt`].

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: a damaged or unsafe file (see [`load_authors_checkpoint`]), missing keys or wrong shapes (named),
            unknown keys with `strict=True`, output folders inside one another or holding the checkpoint, or
            non-empty output folders without `overwrite`; all before anything is written.

    Example:

    ```python
    >>> import lpt_peft
    >>> from lpt_peft.interop.authors import convert_authors_checkpoint
    >>> from peft import PeftModel
    >>> from transformers import ViTModel

    >>> convert_authors_checkpoint("LPT_places.pth", "converted/base", "converted/adapter", dataset="places_lt")
    >>> base = ViTModel.from_pretrained("converted/base", add_pooling_layer=False)
    >>> model = PeftModel.from_pretrained(base, "converted/adapter").eval()
    ```
    """
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    _check_output_dirs(Path(checkpoint), base_dir, adapter_dir, overwrite)
    state_dict, stored_config, val_acc = load_authors_checkpoint(checkpoint, trust_pickle=trust_pickle)
    top_k = top_k if top_k is not None else (_stored_top_k(stored_config) or 2)
    base_name = base_model_name_or_path or str(base_dir.resolve())
    parts = _parse_authors_state_dict(state_dict, num_attention_heads, strict, attn_implementation="sdpa")
    pool_options = dict(shared_layers=shared_layers, num_groups=num_groups, group_prompt_length=group_prompt_length)
    lpt_config = _checked_lpt_config(parts, top_k, id2label, pool_options)

    model = _write_into_place(
        (base_dir, adapter_dir),
        lambda staged: _write_staged(parts, lpt_config, base_name, staged, checkpoint, val_acc, dataset),
    )
    return ConvertedCheckpoint(model, base_dir, adapter_dir, stored_config, val_acc, phase=parts.phase)


def _write_into_place(targets: tuple[Path, Path], write):
    """`write(staged_folders)` into fresh folders beside `targets`, then rename them into place.

    A failure leaves neither staged folders nor parent folders it created behind.
    """
    created = _missing_parents(targets)
    staged: list[Path] = []
    try:
        staged = [_fresh_sibling(folder, "partial") for folder in targets]
        result = write(staged)
        for folder, target in zip(staged, targets):
            _swap_in(folder, target)
        created = []
    finally:
        for folder in staged:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in created:  # a failed conversion leaves no empty folders behind either
            with contextlib.suppress(OSError):
                folder.rmdir()
    return result


def _write_staged(parts: _AuthorsParts, lpt_config, base_name: str, staged, checkpoint, val_acc, dataset):
    from lpt_peft.inference import save_preprocessing

    base_tmp, adapter_tmp = staged
    image_size = parts.vit.config.image_size
    preprocessing = {"image_size": image_size, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    # The backbone is saved before the prompts are injected, so its folder holds plain ViT weights only.
    parts.vit.save_pretrained(base_tmp)
    save_preprocessing(base_tmp, **preprocessing)
    model = _wrap_authors_parts(parts, lpt_config, base_name)

    notes = [f"Converted with `lpt_peft.interop.authors` from the LPT authors' checkpoint "
        f"`{Path(checkpoint).name}`."]
    if parts.phase == 1:
        notes.append("The authors' phase-1 model: the group pool and keys are not trained (phase 2 trains them).")
    if val_acc is not None:
        notes.append(f"The checkpoint records val_acc = {_scalar(val_acc)} (the authors' own evaluation).")
    model.base_model.card_info = {
        "dataset": dataset,
        "base_model": base_name,
        "preprocessing": {**preprocessing, "resize_size": round(image_size * 256 / 224)},
        "notes": notes,
    }
    model.save_pretrained(adapter_tmp)
    return model


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value
