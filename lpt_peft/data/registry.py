"""The data-set registry: every long-tailed data set is a builder function registered under a name.

A builder returns a [`LongTailDataset`] and declares its options by its signature, with the option names of the
training command line (`n_max`, `imbalance`, `data_seed`, `val_per_class`, `num_classes`, `data_root`, ...), so
`--dataset NAME --option value` reaches it unchanged. Options a builder does not declare are refused, never ignored.

```python
>>> from lpt_peft.data import create_dataset, list_datasets
>>> "synthetic" in list_datasets()
True
>>> data = create_dataset("synthetic", num_classes=3, n_max=8, imbalance=4, image_size=8)
>>> data.train_class_counts
[8, 4, 2]
```
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from lpt_peft.data.long_tail import LongTailDataset, labels_as_numpy

# Handled by `create_dataset` for every data set (passed on when the builder declares them itself).
COMMON_OPTIONS = ("verify_images", "num_workers", "max_test_per_class")
# Prefix of a data set loaded with `datasets.load_dataset` (timm's convention): `hfds/<Hub id or local path>`.
HUB_PREFIX = "hfds/"
HUB_BUILDER = "hfds"

_REGISTRY: dict[str, Callable[..., LongTailDataset]] = {}


def register_dataset(name: str | None = None, *, overwrite: bool = False) -> Callable:
    """
    Decorator registering a data-set builder under `name` (default: the function's name), like timm's
    `@register_model`.

    The builder is called with keyword options only; the options it accepts are its parameter names (no `**kwargs`),
    and the first line of its docstring says where its splits and counts come from (it is quoted when an option is
    refused).

    Args:
        name (`str`, *optional*): The name given to `--dataset` / [`create_dataset`].
        overwrite (`bool`, defaults to `False`): Replace a builder already registered under `name`.

    Raises:
        ValueError: `name` is taken by another builder (and `overwrite` is false), starts with `hfds/`, or the
            builder takes `*args`/`**kwargs`.

    Example:

    ```py
    >>> @register_dataset("tiny")
    ... def tiny(n_max: int = 8, imbalance: float = 4, data_seed: int = 0) -> LongTailDataset:
    ...     '''Three classes of generated images.'''
    ...     return make_synthetic_long_tail(3, n_max, imbalance, seed=data_seed)
    ```
    """

    def decorator(builder: Callable[..., LongTailDataset]) -> Callable[..., LongTailDataset]:
        key = name or builder.__name__
        if not isinstance(key, str) or not key or key.startswith(HUB_PREFIX):
            raise ValueError(
                f"A data-set name must be a non-empty string not starting with {HUB_PREFIX!r}, got {key!r}."
            )
        variadic = [
            ("**" if p.kind == p.VAR_KEYWORD else "*") + p.name
            for p in _parameters(builder)
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if variadic:
            raise ValueError(
                f"The builder of data set {key!r} takes {variadic[0]}; declare each option as a named parameter so "
                "that options it does not use can be refused."
            )
        current = _REGISTRY.get(key)
        if current is not None and not overwrite and _qualname(current) != _qualname(builder):
            raise ValueError(
                f"Data set {key!r} is already registered (by {_qualname(current)}); choose another name or pass "
                "`overwrite=True`."
            )
        _REGISTRY[key] = builder
        return builder

    return decorator


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _parameters(builder: Callable) -> list[inspect.Parameter]:
    return list(inspect.signature(builder).parameters.values())


def list_datasets() -> list[str]:
    """Names of the registered data sets, sorted. Any Hub id or local folder also works, see [`resolve_dataset`]."""
    return sorted(_REGISTRY)


def resolve_dataset(name: str) -> tuple[str, dict[str, Any]]:
    """
    The registered builder that `name` stands for, and the options the name itself carries.

    A registered name is itself; `hfds/<id or path>` is the `datasets.load_dataset` builder with `path=<id or path>`;
    an unregistered name that is an existing local path or has the `owner/name` form of a Hub id is the same.

    Raises:
        ValueError: `name` is none of these (the message lists the registered names and a close match).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A data-set name must be a non-empty string, got {name!r}.")
    if name in _REGISTRY:
        return name, {}
    if name.startswith(HUB_PREFIX) and len(name) > len(HUB_PREFIX):
        return HUB_BUILDER, {"path": name[len(HUB_PREFIX) :]}
    if os.path.exists(os.path.expanduser(name)) or "/" in name:
        return HUB_BUILDER, {"path": name}
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Data set {name!r} is not registered and is not a local folder or a Hub id.{hint} Registered: "
        f"{', '.join(list_datasets())}. A Hub data set is named owner/name (or {HUB_PREFIX}<name> when it has no "
        f"owner), a local one by its path; a new one is registered with @register_dataset (docs/extending.md)."
    )


def dataset_options(name: str) -> set[str]:
    """The options data set `name` accepts: its builder's parameter names plus [`COMMON_OPTIONS`]."""
    builder_name, _ = resolve_dataset(name)
    names = {p.name for p in _parameters(_REGISTRY[builder_name])} - {"flag_prefix"}
    return names | set(COMMON_OPTIONS)


def _summary(builder: Callable) -> str:
    doc = inspect.getdoc(builder) or ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else "its builder does not declare it"


def _users(option: str) -> list[str]:
    users = [n for n, b in sorted(_REGISTRY.items()) if option in {p.name for p in _parameters(b)}]
    return [f"Hub/local data sets ({HUB_PREFIX}...)" if n == HUB_BUILDER else n for n in users]


def check_dataset_options(name: str, options: dict[str, Any], flag_prefix: str = "") -> None:
    """
    Refuse every option in `options` that data set `name` does not accept (a silently ignored option is a wrong run).

    Args:
        name (`str`): The data set, as given to [`create_dataset`].
        options (`dict[str, Any]`): Option name to value, as given explicitly.
        flag_prefix (`str`, defaults to `""`): `"--"` to phrase the error for the command line.

    Raises:
        ValueError: names the option and its value, the data set, why (the first docstring line of its builder and
            the data sets that do use the option) and the fix.
    """
    builder_name, _ = resolve_dataset(name)
    accepted = dataset_options(name)
    for option, value in options.items():
        if option in accepted:
            continue
        users = _users(option)
        used_by = f"only {', '.join(users)} use it" if users else "no registered data set uses it"
        if flag_prefix:
            where, fix = f"--{option} {value}", f"Remove --{option} (from the command line or the --config file)."
            subject = f"--dataset {name}"
        else:
            where, fix, subject = (
                f"Option `{option}={value!r}`",
                f"Remove `{option}=` from the call.",
                f"data set {name!r}",
            )
        raise ValueError(
            f"{where} does not apply to {subject} ({_summary(_REGISTRY[builder_name])}; its options are "
            f"{', '.join(sorted(accepted))}); {used_by}. {fix}"
        )


def _check_required(name: str, builder: Callable, options: dict[str, Any], flag_prefix: str) -> None:
    missing = [
        p.name for p in _parameters(builder) if p.default is inspect.Parameter.empty and options.get(p.name) is None
    ]
    if missing == ["path"] and name == HUB_BUILDER:
        raise ValueError(
            f"Name the data set {HUB_PREFIX}<Hub id or local path> (or pass `path=`), not {name!r} alone."
        )
    if missing:
        shown = ", ".join(f"{flag_prefix}{m}" if flag_prefix else f"`{m}`" for m in missing)
        raise ValueError(f"Data set {name!r} needs {shown} (see docs/datasets.md).")


def create_dataset(name: str, *, flag_prefix: str = "", **options: Any) -> LongTailDataset:
    """
    Build the long-tailed data set `name` with `options`.

    `verify_images` (decode every image once, drop and count unreadable ones), `num_workers` (threads for that) and
    `max_test_per_class` (cap the test images per class, for quick runs) are honoured for every data set; any other
    option must be a parameter of the builder.

    Args:
        name (`str`): A registered name ([`list_datasets`]), `hfds/<Hub id or local path>`, or an unregistered
            Hub id (`owner/name`) / existing local folder, loaded with `datasets.load_dataset` (or `load_from_disk`).
        flag_prefix (`str`, defaults to `""`): `"--"` to phrase errors for the command line.
        options: The builder's options, by the names of the training command line.

    Returns:
        [`LongTailDataset`]: the splits, class names and training counts.

    Raises:
        ValueError: an unknown data set, an option the data set does not accept, a required option missing, or
            the builder's own errors (missing files, bad layout, ...).

    Example:

    ```py
    >>> data = create_dataset("fashion_mnist_lt", n_max=100, imbalance=10, max_test_per_class=50)
    >>> data.train_class_counts[0], len(data.test)
    (100, 500)
    ```
    """
    builder_name, implied = resolve_dataset(name)
    check_dataset_options(name, options, flag_prefix)
    builder = _REGISTRY[builder_name]
    accepted = {p.name for p in _parameters(builder)}
    # None means "not given": the builder's default applies (the command line's unset paths are None).
    call = {**implied, **{k: v for k, v in options.items() if k in accepted and v is not None}}
    _check_required(name, builder, call, flag_prefix)
    if "flag_prefix" in accepted:  # builders that phrase errors with the option names take it
        call["flag_prefix"] = flag_prefix
    data = builder(**call)
    if not isinstance(data, LongTailDataset):
        raise TypeError(f"The builder of data set {name!r} returned {type(data).__name__}, not a LongTailDataset.")
    if options.get("verify_images") and "verify_images" not in accepted:
        from lpt_peft.data.benchmarks import drop_unreadable_images

        data = drop_unreadable_images(data, num_workers=max(1, int(options.get("num_workers") or 1)))
    cap = options.get("max_test_per_class")
    if cap and "max_test_per_class" not in accepted:
        data.test = cap_per_class(data.test, int(cap))
    return data


def cap_per_class(dataset, cap: int):
    """The first `cap` rows of each class of `dataset` (in row order), for quick evaluations."""
    if cap < 1:
        raise ValueError(f"`max_test_per_class` must be >= 1, got {cap}.")
    labels = labels_as_numpy(dataset)
    keep = np.concatenate([np.flatnonzero(labels == c)[:cap] for c in np.unique(labels)])
    return dataset.select(np.sort(keep))


# ------------------------------------------------------------------------------------------- the command line
def _dataset_arguments(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value of every data-set argument of `args`, the data-only ones set to a non-default value).

    Shared arguments (`image_size`, a model option a builder may also use) are passed when declared, never refused.
    """
    from lpt_peft.training.arguments import DATASET_ARGUMENTS, SHARED_DATASET_ARGUMENTS

    fields = {f.name: f for f in dataclasses.fields(args)}
    values = {option: getattr(args, option) for option in (*DATASET_ARGUMENTS, *SHARED_DATASET_ARGUMENTS)}
    explicit = {
        option: values[option]
        for option in DATASET_ARGUMENTS
        if values[option] is not None and values[option] != fields[option].default
    }
    return values, explicit


def check_dataset_arguments(args: Any) -> None:
    """Refuse, when `args` is built, a data-set argument set for a data set that does not accept it."""
    _, explicit = _dataset_arguments(args)
    check_dataset_options(args.dataset, explicit, flag_prefix="--")


def dataset_options_from_args(args: Any, resolve_defaults: bool = False) -> dict[str, Any]:
    """
    The options `--dataset args.dataset` is built with: each data-set argument of [`LPTTrainingArguments`] the data
    set accepts and the command line sets. An argument left at `None` ("the data set's own default") is not passed,
    so the builder's keyword default applies (the command line's values never override a builder's with values chosen
    for another data set).

    Args:
        args ([`LPTTrainingArguments`]): The run's arguments.
        resolve_defaults (`bool`, defaults to `False`): Also list the builder's keyword defaults of the options not
            passed: what a run records to rebuild its data set and to show which subsampling it trained on.

    Raises:
        ValueError: a data-set argument set for a data set that does not accept it.
    """
    values, _ = _dataset_arguments(args)
    check_dataset_arguments(args)
    accepted = dataset_options(args.dataset)
    passed = {k: v for k, v in values.items() if k in accepted and v is not None}
    if not resolve_defaults:
        return passed
    builder_name, _ = resolve_dataset(args.dataset)
    defaults = {
        p.name: p.default
        for p in _parameters(_REGISTRY[builder_name])
        if p.name in accepted and p.default is not inspect.Parameter.empty
    }
    return {**defaults, **passed}


def dataset_from_args(args: Any) -> LongTailDataset:
    """
    The data set of a training run: `create_dataset(args.dataset, **dataset_options_from_args(args))`. An argument
    the data set does not accept is refused when set (already when `args` is built), ignored at its default.
    """
    return create_dataset(args.dataset, flag_prefix="--", **dataset_options_from_args(args))


def registered_builders() -> Iterable[tuple[str, Callable[..., LongTailDataset]]]:
    """`(name, builder)` pairs, sorted by name."""
    return sorted(_REGISTRY.items())


def _load_builtin_datasets() -> None:
    """Import every module of `lpt_peft.data`: the built-in data sets register themselves when their module loads.

    `lpt_peft.data` imports lazily (inference needs none of this), so the registry loads them, and
    `from lpt_peft.data.registry import create_dataset` sees them all, a data-set module added later included.
    """
    import importlib
    import pkgutil

    package = importlib.import_module("lpt_peft.data")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


_load_builtin_datasets()
