"""Every example script prints user errors as `error: <message>` naming its own flags, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest
from testing_utils import REPO, load_script

from lpt_peft.cli import TRAINING_FLAGS, LPTUsageError, cli_entry, format_error


def run_script(name, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LPT_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_usage_error_names_arguments_in_python_and_flags_in_scripts():
    err = LPTUsageError("pass {base_model} or {trust_pickle}.", "base_model", trust_pickle="trust_pickle=True")
    assert isinstance(err, ValueError) and str(err) == "pass base_model= or trust_pickle=True."
    assert err.render({"base_model": "--base", "trust_pickle": "--trust_pickle"}) == "pass --base or --trust_pickle."
    # Braces in quoted values do not break a message without arguments.
    assert str(LPTUsageError("folder '/tmp/{x}' exists")) == "folder '/tmp/{x}' exists"


def test_plain_library_messages_get_flags_for_backticked_arguments():
    err = FileNotFoundError("`split_dir` holds the split files; pass the images as `root` (or `verify_images=True`).")
    assert format_error(err, TRAINING_FLAGS) == (
        "`--split_dir` holds the split files; pass the images as `--data_root` (or `--verify_images true`)."
    )
    assert format_error(ValueError("root of the problem"), TRAINING_FLAGS) == "root of the problem"


def test_cli_entry_exits_2_with_the_message_and_keeps_bugs_loud(capsys, monkeypatch):
    @cli_entry(flags={"base_model": "--base"})
    def main(kind):
        if kind == "usage":
            raise LPTUsageError("no base; pass {base_model}.", "base_model")
        if kind == "missing":
            raise FileNotFoundError("split file /data/x.txt does not exist")
        raise RuntimeError("a bug")

    for kind, message in (("usage", "error: no base; pass --base.\n"), ("missing", "error: split file")):
        with pytest.raises(SystemExit) as exit_info:
            main(kind)
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(message)
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        main("bug")
    monkeypatch.setenv("LPT_DEBUG", "1")
    with pytest.raises(LPTUsageError):
        main("usage")


def test_train_script_missing_split_file_prints_no_traceback(tmp_path):
    """The issue's case: a missing Places-LT split file (a correct message under a stack trace before)."""
    result = run_script(
        "train_lpt",
        "--dataset", "places_lt", "--data_root", str(tmp_path), "--split_dir", str(tmp_path / "splits"),
        "--model_name_or_path", "tiny-random", "--shared_layers", "2", "--output_dir", str(tmp_path / "out"),
        "--report_to", "none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "error: " in result.stderr
    assert "Places_LT_train.txt" in result.stderr
    # The data loader's argument names come out as the script's flags.
    assert "`--split_dir`" in result.stderr and "`--data_root`" in result.stderr
    assert "`split_dir`" not in result.stderr and "`root`" not in result.stderr


def test_evaluate_script_errors(tmp_path, capsys):
    evaluate = load_script("evaluate_lpt")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2 and "--adapter is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--adapter", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "adapter_config.json" in capsys.readouterr().err
    # An output file that cannot be written is refused before the (long) evaluation, naming the flag.
    (tmp_path / "adapter").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--adapter", str(tmp_path / "adapter"), "--json_out", str(tmp_path / "nonexist" / "r.json")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(f"error: --json_out {tmp_path / 'nonexist' / 'r.json'}")
    assert "does not exist" in error


def test_summarize_and_convert_scripts_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("summarize_runs").main([str(tmp_path / "no_run")])
    assert exit_info.value.code == 2 and "results.json" in capsys.readouterr().err
    convert = load_script("convert_authors_checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--checkpoint", str(tmp_path / "LPT_places.pth"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "LPT_places.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_script_names_its_flags(tmp_path):
    """A library message that names a Python argument names the script's flag instead (`--trust_pickle`)."""
    from fractions import Fraction

    import torch

    torch.save({"state_dict": {}, "config": Fraction(1, 3)}, tmp_path / "c.pth")  # not allowed by weights_only
    result = run_script(
        "convert_authors_checkpoint", "--checkpoint", "c.pth", "--output_dir", "out", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--trust_pickle" in result.stderr and "trust_pickle=True" not in result.stderr
