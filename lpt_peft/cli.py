"""What the example scripts share: user errors printed as one `error: ...` line (exit status 2), never a traceback.

A user error raised deep in the library (a missing split file, a bad option, an adapter without a base) is the same
message whether it comes from Python or from a script, except for how it names what to change: Python callers pass
arguments (`base_model=`), script users pass flags (`--base`). [`LPTUsageError`] keeps the argument names apart from
the text so that [`cli_entry`] can print the script's flag instead.

```python
from lpt_peft.cli import cli_entry


@cli_entry(flags={"base_model": "--base"})
def main(argv=None):
    ...
```

Set `LPT_DEBUG=1` to get the full traceback instead (for bug reports).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRAINING_FLAGS", "USER_ERRORS", "LPTUsageError", "cli_entry", "format_error"]


class LPTUsageError(ValueError):
    """A user error whose message names arguments, rendered as `name=` in Python and as the flag in a script.

    Args:
        template: The message, with `{argument}` where an argument name goes, e.g.
            `"The adapter records no base model; pass {base_model} (a folder or Hub id)."`.
        *arguments: The argument names used in `template` (each becomes `name=` unless a script maps it).
        **python_spelling: Arguments written otherwise in Python, e.g. `trust_pickle="trust_pickle=True"`.

    Example:

    ```python
    >>> err = LPTUsageError("pass {base_model} (a folder or Hub id).", "base_model")
    >>> str(err)
    'pass base_model= (a folder or Hub id).'
    >>> err.render({"base_model": "--base"})
    'pass --base (a folder or Hub id).'
    ```
    """

    def __init__(self, template: str, *arguments: str, **python_spelling: str) -> None:
        self.template = template
        self.python = {**{name: f"{name}=" for name in arguments}, **python_spelling}
        super().__init__(self.render())

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with each argument written as its flag in `flags`, else as in Python (`name=`)."""
        if not self.python:
            return self.template
        flags = flags or {}
        try:
            return self.template.format(**{name: flags.get(name, python) for name, python in self.python.items()})
        except (KeyError, IndexError, ValueError):  # braces in a path or value quoted in the message
            return self.template


# What the library (and transformers / huggingface_hub, for paths and Hub ids) raises for bad input, files and I/O:
# printed as a message that names the path and the cause. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


# The data loaders name their Python arguments in `backticks`; the training scripts take them as these flags.
TRAINING_FLAGS = {
    "root": "--data_root",
    "data_dir": "--data_root",
    "split_dir": "--split_dir",
    "train_dir": "--train_dir",
    "val_dir": "--val_dir",
    "test_dir": "--test_dir",
    "verify_images=True": "--verify_images true",
    "verify_images": "--verify_images",
    "image_size": "--image_size",  # raised by lpt_peft.backbones.load_backbone
    "base_model": "--model_name_or_path",
}


def format_error(err: BaseException, flags: Mapping[str, str] | None = None) -> str:
    """The message a script prints for a user error, with Python argument names replaced by the script's flags.

    [`LPTUsageError`] messages are rendered with `flags`; in other messages an argument written in backticks
    (`` `split_dir` ``) is replaced by its flag (`` `--split_dir` ``).
    """
    if isinstance(err, LPTUsageError):
        return err.render(flags)
    message = str(err)
    for name, flag in (flags or {}).items():
        message = message.replace(f"`{name}`", f"`{flag}`")
    return message


def cli_entry(flags: Mapping[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a script's `main`: user errors print `error: <message>` on stderr and exit with status 2.

    Args:
        flags: Python argument name -> the script's flag, used to render [`LPTUsageError`] messages.

    Raises:
        SystemExit: with code 2 on a user error (argparse uses 2 for bad flags too).
    """

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except USER_ERRORS as err:
                if os.environ.get("LPT_DEBUG"):
                    raise
                print(f"error: {format_error(err, flags)}", file=sys.stderr)
                raise SystemExit(2) from None

        return wrapper

    return decorate


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before any work is done (the error names `flag`)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise LPTUsageError(f"{flag} {path} is a folder; give a file name inside it, e.g. {target / 'out.json'}.")
    parent = target.parent
    if not parent.is_dir():
        raise LPTUsageError(f"{flag} {path}: the folder {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise LPTUsageError(f"{flag} {path}: permission denied; choose a path you can write.")


def write_output_file(path: str, flag: str, write) -> None:
    """`write(handle)` into `path`; an I/O error (e.g. a full disk) names `flag`, the path and the cause."""
    try:
        with open(path, "w", newline="") as handle:
            write(handle)
    except OSError as err:
        raise LPTUsageError(f"{flag} {path}: cannot write the file ({err.strerror or err}).") from None
