"""Export a trained LPT classifier through `torch.export` (an `ExportedProgram`, `.pt2`) and to ONNX.

The exported graph maps preprocessed `pixel_values` `(batch, channels, image_size, image_size)` float32 to the
adapter's cosine logits `(batch, num_labels)`; a phase-2 export also returns the `group_indices` `(batch, top_k)` of
the prompt groups each image chose, and computes that choice (the query pass, cosine to the keys, top-k, the mean
group prompt) inside the graph. Only the batch size is dynamic. Fixed at export time:

- the image size (the position embeddings are laid out for it; DINOv2's interpolation is traced at that size),
- the phase and the adapter (its prompts, keys and classifier become constants of the graph),
- float32 weights and the attention implementation (`"sdpa"` or `"eager"`).

Preprocessing (resize, crop, normalisation) is not part of the graph; the exported files carry it, with the class
names and the logit scale, as metadata (see [`read_export_metadata`]). To change any fixed part, export again.

```python
>>> from lpt_peft.export import export_onnx, save_program
>>> save_program("outputs/demo/phase2", "lpt_demo.pt2")  # an adapter folder (its recorded base) or a PeftModel
>>> export_onnx("outputs/demo/phase2", "lpt_demo.onnx")
```

Import from `lpt_peft.export` (the package does not import this module, so `import lpt_peft` stays light). ONNX
export needs `onnx` and `onnxscript` (torch's dynamo-based exporter), running it `onnxruntime`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXPORT_METADATA_KEY",
    "INPUT_NAME",
    "LPTExportError",
    "LPTExportModule",
    "export_onnx",
    "export_program",
    "load_program",
    "output_names",
    "read_export_metadata",
    "save_program",
]

INPUT_NAME = "pixel_values"
EXPORT_METADATA_KEY = "lpt_export"
_PROGRAM_METADATA_FILE = "lpt_export.json"
_SUPPORTED_ATTENTION = ("eager", "sdpa")
# Above this many bytes of weights, ONNX's 2 GiB protobuf limit needs the weights in an external data file.
_ONNX_INLINE_LIMIT = 1_800_000_000


class LPTExportError(RuntimeError):
    """`torch.export` or the ONNX exporter failed on a model that passed LPT's own checks (nothing was written)."""


class LPTExportModule(nn.Module):
    """`pixel_values -> (logits,)` in phase 1, `-> (logits, group_indices)` in phase 2: the graph that is exported.

    Args:
        model: A `PeftModel` with one active LPT adapter (held, not copied).

    Example:

    ```python
    >>> module = LPTExportModule(peft_model)
    >>> logits, group_indices = module(torch.randn(4, 3, 224, 224))  # a phase-2 adapter
    ```
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.phase = int(_lpt_config(model).phase)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values=pixel_values, return_dict=True)
        return (output.logits, output.group_indices) if self.phase == 2 else (output.logits,)


def output_names(phase: int) -> list[str]:
    """Names of the exported graph's outputs: `["logits"]` in phase 1, `["logits", "group_indices"]` in phase 2."""
    return ["logits", "group_indices"] if phase == 2 else ["logits"]


# ------------------------------------------------------------------------------------------------------ checks
def _lpt_config(model: nn.Module):
    from lpt_peft.tuner.config import LPTConfig

    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if not isinstance(config, LPTConfig):
        raise TypeError(
            f"Export needs a PeftModel with an active LPT adapter, an LPTImageClassifier or an adapter folder, got "
            f"{type(model).__name__}. Load a saved adapter with `lpt_peft.inference.load_classifier(base, adapter)`."
        )
    return config


def _resolve_model(model: Any, base_model: Any) -> tuple[nn.Module, Any]:
    """`(peft_model, transform or None)` from an adapter folder / Hub id, an LPTImageClassifier or a PeftModel."""
    from lpt_peft.inference import LPTImageClassifier, load_classifier

    if isinstance(model, (str, os.PathLike)):
        model = load_classifier(base_model, model, device="cpu")
    elif base_model is not None:
        raise ValueError("base_model= is only used with an adapter folder or Hub id; the model passed is loaded.")
    if isinstance(model, LPTImageClassifier):
        return model.model, model.transform
    _lpt_config(model)
    return model, None


def _check_exportable(model: nn.Module) -> str:
    """Refuse what the exported graph could not reproduce; returns the active adapter's name."""
    tuner = model.base_model
    adapter = tuner._active_lpt_adapter() if getattr(tuner, "_lpt_enabled", True) else None
    if adapter is None:
        raise ValueError(
            "The LPT adapter is disabled (inside `with model.disable_adapter():`) or none is active; the export "
            "would be the plain backbone. Export outside that block, after `model.set_adapter(name)`."
        )
    from lpt_peft.tuner.layer import LPTAttention

    for module in model.modules():
        if isinstance(module, LPTAttention):
            impl = module.base_layer.config._attn_implementation
            if impl not in _SUPPORTED_ATTENTION:
                raise ValueError(
                    f"Cannot export attention implementation {impl!r}; load the backbone with "
                    "attn_implementation='sdpa' (or 'eager'), which torch.export and ONNX can express."
                )
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if wrong:
        raise ValueError(
            f"Export is float32 only (the equality guarantee against PyTorch and ONNX Runtime's CPU kernels), but "
            f"the model has {', '.join(wrong)} weights. Call `model.float()` first, or load it without `dtype=`."
        )
    return adapter


def _resolve_image_size(model: nn.Module, image_size: int | None, transform) -> tuple[int, int]:
    """`(image_size, num_channels)` the graph is exported for, checked against the backbone and the preprocessing."""
    from lpt_peft.backbones import backbone_image_size, check_image_size
    from lpt_peft.cli import LPTUsageError
    from lpt_peft.tuner.architectures import get_architecture

    base = model.get_base_model()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise LPTUsageError(f"{{image_size}} must be a positive int (pixels), got {image_size!r}.", "image_size")
    if transform is not None:
        if image_size is not None and image_size != transform.image_size:
            raise LPTUsageError(
                f"{{image_size}} is {image_size}, but the classifier's preprocessing crops {transform.image_size} px "
                "images. Leave {image_size} unset, or load the classifier with that image size.",
                "image_size",
            )
        image_size = transform.image_size
    image_size = image_size if image_size is not None else backbone_image_size(base)
    if image_size is None:
        raise LPTUsageError("The base model's config records no image size; pass {image_size}.", "image_size")
    check_image_size(base, image_size)
    config = get_architecture(base).encoder(base).config
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and image_size % patch:
        raise LPTUsageError(
            f"{{image_size}} {image_size} is not a multiple of the patch size {patch}; the border pixels would be "
            f"dropped silently. Use {image_size // patch * patch} or {(image_size // patch + 1) * patch}.",
            "image_size",
        )
    return image_size, int(getattr(config, "num_channels", 3))


def _check_destination(path: str | os.PathLike, suffix: str, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"The export file must end in {suffix!r}, got {str(path)!r}.")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; pass a file name ending in {suffix!r}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it, or choose another name.")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{str(path.parent)!r} is not a folder.")
    return path


# ------------------------------------------------------------------------------------------------------ export
@contextmanager
def _eval_mode(model: nn.Module):
    """Evaluation mode for the trace (no dropout), restoring each module's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _prepare(model, base_model, image_size) -> dict[str, Any]:
    peft_model, transform = _resolve_model(model, base_model)
    adapter = _check_exportable(peft_model)
    image_size, channels = _resolve_image_size(peft_model, image_size, transform)
    return {"model": peft_model, "adapter": adapter, "image_size": image_size, "channels": channels,
            "transform": transform}  # fmt: skip


def _trace(prepared: dict[str, Any], example_batch_size: int) -> torch.export.ExportedProgram:
    model = prepared["model"]
    size, channels = prepared["image_size"], prepared["channels"]
    device = next(model.parameters()).device
    # Batch 1 would specialise the batch dimension to a constant; 2 keeps it symbolic.
    example = torch.randn(example_batch_size, channels, size, size, device=device)
    batch = torch.export.Dim("batch", min=1)
    module = LPTExportModule(model)
    # Under torch.export, `torch.compiler.is_compiling()` is True, so LPTAttention takes its concatenation path
    # rather than the eager buffer (`out=` into a view, an autograd Function), which a graph cannot express.
    with _eval_mode(model), torch.no_grad():
        try:
            return torch.export.export(module, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
        except Exception as err:
            base = type(model.get_base_model()).__name__
            raise LPTExportError(
                f"torch.export could not trace the LPT model on a {base} backbone ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}). This backbone's forward is not "
                "exportable; nothing was written. Use a registered backbone family (ViT, DeiT, DINOv2, CLIP)."
            ) from err


def _metadata(prepared: dict[str, Any]) -> dict[str, Any]:
    """What a consumer of the exported file needs besides the graph: input layout, outputs, preprocessing, labels."""
    import lpt_peft

    model, adapter, transform = prepared["model"], prepared["adapter"], prepared["transform"]
    config = model.peft_config[adapter]
    size = prepared["image_size"]
    preprocessing = None
    if transform is not None:
        preprocessing = {"resize_size": transform.resize_size, "crop_size": transform.image_size,
                         "mean": list(transform.mean), "std": list(transform.std),
                         "interpolation": transform.interpolation}  # fmt: skip
    return {
        "lpt_peft_version": lpt_peft.__version__,
        "torch_version": torch.__version__,
        "adapter_name": adapter,
        "base_model": config.base_model_name_or_path,
        "phase": int(config.phase),
        "top_k": int(config.top_k) if config.phase == 2 else None,
        "input_name": INPUT_NAME,
        "input_shape": ["batch", prepared["channels"], size, size],
        "image_size": size,
        "output_names": output_names(config.phase),
        "num_labels": int(config.num_labels),
        "id2label": {str(k): v for k, v in config.id2label.items()} if config.id2label else None,
        "logit_scale": float(config.logit_scale),
        "preprocessing": preprocessing,
    }


def export_program(
    model: Any,
    image_size: int | None = None,
    base_model: Any = None,
    example_batch_size: int = 2,
) -> torch.export.ExportedProgram:
    """Trace a trained LPT classifier into a `torch.export.ExportedProgram` with a dynamic batch dimension.

    The program takes `pixel_values` `(batch, channels, image_size, image_size)` float32, already preprocessed, and
    returns `(logits,)` in phase 1 or `(logits, group_indices)` in phase 2: `logits` `(batch, num_labels)` float32
    cosines in [-1, 1] (argmax = prediction), `group_indices` `(batch, top_k)` int64. Run it with
    `program.module()(pixel_values)`. The model is traced in evaluation mode and left as it was.

    Args:
        model: A `PeftModel` with an active LPT adapter, an [`~lpt_peft.inference.LPTImageClassifier`], or an
            adapter folder / Hub id (loaded on CPU with [`~lpt_peft.inference.load_classifier`]).
        image_size: Input resolution in pixels; default the classifier's crop size, else the base model's
            `config.image_size`. Backbones other than DINOv2 run at their config's size only.
        base_model: With an adapter folder: its base (default the base recorded in the adapter).
        example_batch_size: Batch of the random example input (>= 2, so the batch dimension stays symbolic).

    Returns:
        The `ExportedProgram`; the batch size is free (>= 1), everything else fixed (see the module docstring).

    Raises:
        TypeError: `model` is not an LPT model.
        ValueError: the adapter is disabled, the weights are not float32, or the attention implementation is
            neither `"sdpa"` nor `"eager"`.
        lpt_peft.cli.LPTUsageError: `image_size` does not fit the backbone, the patch size or the preprocessing.
        LPTExportError: `torch.export` cannot trace the backbone.

    Example:

    ```python
    >>> from lpt_peft.export import export_program
    >>> program = export_program(peft_model)  # phase 2
    >>> logits, group_indices = program.module()(torch.randn(8, 3, 224, 224))
    ```
    """
    if isinstance(example_batch_size, bool) or not isinstance(example_batch_size, int) or example_batch_size < 2:
        raise ValueError(f"example_batch_size must be an int >= 2, got {example_batch_size!r}.")
    return _trace(_prepare(model, base_model, image_size), example_batch_size)


# ------------------------------------------------------------------------------------------------------ files
def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary folder beside `path`, then move what it wrote into place (main file last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(staging / path.name)
        if not (staging / path.name).is_file():
            raise LPTExportError(f"The exporter wrote no {path.name}; nothing was written.")
        companions = [p for p in staging.iterdir() if p.name != path.name]
        for produced in [*companions, staging / path.name]:
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def save_program(
    model: Any,
    path: str | os.PathLike,
    image_size: int | None = None,
    base_model: Any = None,
    overwrite: bool = False,
) -> Path:
    """Export a trained LPT classifier with [`export_program`] and save it with `torch.export.save` as a `.pt2` file.

    The file also holds [`read_export_metadata`]'s JSON (image size, phase, output names, class names, logit scale,
    preprocessing). Load it with [`load_program`] (or `torch.export.load`). Everything is checked before anything is
    written, and the file is written to a temporary name and moved into place: a failed export leaves no file.

    Args:
        model: A `PeftModel` with an active LPT adapter, an `LPTImageClassifier`, or an adapter folder / Hub id.
        path: Destination file, ending in `.pt2`.
        image_size / base_model: As for [`export_program`].
        overwrite: Replace an existing file at `path`.

    Returns:
        `path` as a `Path`.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError / TypeError / LPTUsageError / LPTExportError: as for [`export_program`]; a bad suffix.

    Example:

    ```python
    >>> save_program("outputs/demo/phase2", "lpt_demo.pt2")
    >>> program = load_program("lpt_demo.pt2")
    >>> logits, group_indices = program.module()(pixel_values)
    ```
    """
    path = _check_destination(path, ".pt2", overwrite)
    prepared = _prepare(model, base_model, image_size)
    program = _trace(prepared, 2)
    extra = {_PROGRAM_METADATA_FILE: json.dumps(_metadata(prepared), indent=2)}
    return _write_atomically(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load a `.pt2` file written by [`save_program`]; run it with `program.module()(pixel_values)`.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"No exported program at {str(path)!r}.")
    return torch.export.load(path)


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an LPT export carries: `phase`, `image_size`, `input_shape`, `output_names`, `id2label`,
    `logit_scale`, `preprocessing` (resize/crop sizes, mean, std; None when a bare PeftModel was exported), ...

    Read from a `.pt2` file's extra file `lpt_export.json` or an `.onnx` file's `metadata_props["lpt_export"]`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file holds no LPT export metadata (it was not written by this module).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No exported file at {str(path)!r}.")
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get(EXPORT_METADATA_KEY)
    else:
        text = _program_extra_file(path, _PROGRAM_METADATA_FILE)
    if text is None:
        raise ValueError(f"{str(path)!r} holds no LPT export metadata; it was not written by lpt_peft.export.")
    return json.loads(text)


def _program_extra_file(path: Path, name: str) -> str | None:
    """An extra file of a `.pt2` archive (a zip), read without loading the program's weights."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for entry in archive.namelist():
                if entry.endswith(f"/extra/{name}"):
                    return archive.read(entry).decode()
    extra = {name: ""}  # another archive layout: let torch read it
    torch.export.load(path, extra_files=extra)
    return extra[name] or None


def _onnx_program(program: torch.export.ExportedProgram, phase: int, opset_version: int | None):
    try:
        import onnxscript  # noqa: F401  (torch's dynamo-based ONNX exporter needs it)
    except ImportError as err:
        raise ImportError(
            "ONNX export needs `onnx` and `onnxscript`: pip install onnx onnxscript (or lpt-peft[dev])."
        ) from err
    try:
        return torch.onnx.export(
            program,
            input_names=[INPUT_NAME],
            output_names=output_names(phase),
            opset_version=opset_version,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as err:
        raise LPTExportError(f"The ONNX exporter failed ({type(err).__name__}: {err}); nothing was written.") from err


def _name_batch_axis(model) -> None:
    """Call the symbolic batch dimension of every graph input and output "batch" (the exporter names it s0, ...)."""
    import onnx_ir

    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is not None and len(value.shape) > 0 and not isinstance(value.shape[0], int):
            dims = list(value.shape)
            dims[0] = onnx_ir.SymbolicDim("batch")
            value.shape = onnx_ir.Shape(dims)


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    image_size: int | None = None,
    base_model: Any = None,
    opset_version: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a trained LPT classifier to an ONNX file (torch's dynamo-based exporter, from [`export_program`]).

    Input `pixel_values` `(batch, channels, image_size, image_size)` float32 with a dynamic `batch` axis; outputs
    `logits` `(batch, num_labels)` and, in phase 2, `group_indices` `(batch, top_k)` int64 (the top-k group choice
    is in the graph). Run it with `onnxruntime.InferenceSession(path).run(None, {"pixel_values": array})`. The
    weights are stored inside the file (an external `<name>.data` file only past ~1.8 GB of weights), and the
    metadata of [`read_export_metadata`] in `metadata_props["lpt_export"]`. The file is written to a temporary
    name and moved into place: a failed export leaves no file.

    Args:
        model: A `PeftModel` with an active LPT adapter, an `LPTImageClassifier`, or an adapter folder / Hub id.
        path: Destination file, ending in `.onnx`.
        image_size / base_model: As for [`export_program`].
        opset_version: ONNX opset; default the exporter's.
        overwrite: Replace an existing file at `path`.

    Returns:
        `path` as a `Path`.

    Raises:
        ImportError: `onnxscript` is not installed.
        FileExistsError: `path` exists and `overwrite` is False.
        ValueError / TypeError / LPTUsageError / LPTExportError: as for [`export_program`]; a bad suffix.

    Example:

    ```python
    >>> import onnxruntime
    >>> export_onnx(classifier, "lpt.onnx")
    >>> session = onnxruntime.InferenceSession("lpt.onnx", providers=["CPUExecutionProvider"])
    >>> logits = session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]
    ```
    """
    path = _check_destination(path, ".onnx", overwrite)
    prepared = _prepare(model, base_model, image_size)
    program = _trace(prepared, 2)
    metadata = _metadata(prepared)
    onnx_program = _onnx_program(program, metadata["phase"], opset_version)
    _name_batch_axis(onnx_program.model)
    onnx_program.model.metadata_props[EXPORT_METADATA_KEY] = json.dumps(metadata)
    weight_bytes = sum(p.numel() * p.element_size() for p in prepared["model"].parameters())
    external = weight_bytes > _ONNX_INLINE_LIMIT
    return _write_atomically(path, lambda tmp: onnx_program.save(str(tmp), external_data=external))
