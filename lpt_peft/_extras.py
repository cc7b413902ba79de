"""Optional dependencies: the install profile that provides each one, its one error message, and lazy exports.

`pip install lpt-peft` installs what inference and `get_peft_model` need; the training recipe, the data sets, the
metrics and the plots need `pip install 'lpt-peft[train]'`. A module that needs an extra imports it under
[`requires_extras`], so that a missing package is reported with the command that installs it:

```python
from lpt_peft._extras import requires_extras

with requires_extras(__name__):
    import datasets
```

Package `__init__` files export their names through [`lazy_exports`] (PEP 562), so that `import lpt_peft` and
`import lpt_peft.data.transforms` do not import the training extras.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["EXTRA_MODULES", "extras_message", "lazy_exports", "requires_extras"]

# Top-level modules of the optional dependencies, and the profile (pyproject's optional-dependencies) providing them.
EXTRA_MODULES = {
    "accelerate": "train",
    "datasets": "train",
    "evaluate": "train",
    "pyarrow": "train",
    "yaml": "train",
    "tqdm": "train",
    "matplotlib": "train",
    "tensorboard": "train",
    "onnx": "demo",
    "onnxruntime": "dev",
}
_PROFILE_NAMES = {"train": "training", "demo": "demo", "dev": "development"}


def extras_message(feature: str, module: str, profile: str = "train") -> str:
    """The one message for a missing optional dependency.

    Args:
        feature: What needs it, e.g. `"lpt_peft.training.run"`.
        module: The module that could not be imported, e.g. `"datasets"`.
        profile: The install profile (extra) that provides it: `"train"`, `"demo"` or `"dev"`.

    Returns:
        `"<feature> needs the training extras: pip install 'lpt-peft[train]' (missing module 'datasets')."`
    """
    return (
        f"{feature} needs the {_PROFILE_NAMES.get(profile, profile)} extras: pip install 'lpt-peft[{profile}]' "
        f"(missing module {module!r})."
    )


@contextlib.contextmanager
def requires_extras(feature: str) -> Iterator[None]:
    """Re-raise a `ModuleNotFoundError` for an optional dependency as an `ImportError` that names the install command.

    Args:
        feature: What needs the imports in the block (usually the importing module's `__name__`).

    Raises:
        ImportError: A module of [`EXTRA_MODULES`] is not installed; the message is [`extras_message`]'s. Any other
            import error passes through unchanged.
    """
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in EXTRA_MODULES:
            raise
        raise ImportError(extras_message(feature, top, EXTRA_MODULES[top]), name=err.name) from err


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """A package's PEP 562 `__getattr__` and `__dir__`, and its `__all__`, for names loaded on first access.

    Args:
        package: The package's `__name__`.
        exports: `{submodule: names}`, e.g. `{"lpt_peft.data.hub": ["load_hub_dataset"]}`.

    Returns:
        `(__getattr__, __dir__, __all__)`; `__getattr__` imports the submodule that defines a name the first time it
        is asked for and caches the value in the package.
    """
    where = {name: module for module, names in exports.items() for name in names}
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__, sorted(where)
