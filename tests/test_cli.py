"""The CLI surface: help for every subcommand, --print-config, errors as one line, honest stubs."""

import subprocess
import sys

import pytest
import yaml

from m1_align.cli import STAGES, main

SUBCOMMANDS = [*STAGES, "pipeline", "data"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "m1_align.cli", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ["sft", "elo", "tdpo", "ppo", "rm", "rm-eval", "eval", "pipeline", "data"]:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    args = [name, "build", "--help"] if name == "data" else [name, "--help"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert "--print-config" in capsys.readouterr().out


def test_print_config_applies_overrides(capsys):
    assert main(["tdpo", "--print-config", "tdpo.beta=0.2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tdpo"]["beta"] == 0.2 and printed["tdpo"]["loss"] == "tdpo2"


def test_overrides_after_only_and_from_are_taken(capsys):
    """The example at the top of configs/quickstart.yaml puts its override after `--only sft`."""
    example = next(line.split("m1-align", 1)[1].split() for line in open("configs/quickstart.yaml")
                   if "--only" in line and "=" in line)
    assert main([*example, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stages"]["sft"]["train"]["learning_rate"] == 1e-3
    assert main(["pipeline", "configs/quickstart.yaml", "--from", "rm", "stages.rm.train.max_steps=3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stages"]["rm"]["train"]["max_steps"] == 3
    assert main(["eval", "--print-config", "eval.limit=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["limit"] == 3
    with pytest.raises(SystemExit) as exit_:  # an unknown flag is still refused
        main(["pipeline", "configs/quickstart.yaml", "--only", "rm", "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_misspelt_key_gives_one_line_with_suggestion(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lerning_rate: 1.0e-5\n")
    out = run_cli("sft", str(path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: unknown key 'train.lerning_rate' in {path}; did you mean 'train.learning_rate'?"


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["sft", f"output_dir={tmp_path}/out", f"model.path={tmp_path}/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model path") and "no Hugging Face model" in err and "\n" not in err


def test_finished_output_is_never_overwritten(tmp_path, capsys):
    from m1_align.runs import StageResult

    StageResult("sft", str(tmp_path), {}).save()
    assert main(["sft", f"output_dir={tmp_path}"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_overwrite_starts_a_finished_run_over_but_an_unfinished_one_resumes(tmp_path):
    from m1_align.runs import StageResult, prepare_output_dir

    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    for out in (finished, unfinished):
        (out / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    StageResult("sft", str(finished), {}).save()
    prepare_output_dir(finished, overwrite=True)
    prepare_output_dir(unfinished, overwrite=True)
    assert finished.is_dir() and not any(finished.iterdir())  # nothing left to resume from
    assert (unfinished / "checkpoints" / "checkpoint-10").is_dir()
    # the replaced run is kept, visibly, until the new one finishes
    previous = tmp_path / "finished.previous"
    assert (previous / "result.json").is_file() and (previous / "checkpoints" / "checkpoint-10").is_dir()
    StageResult("sft", str(finished), {}).save()
    assert not previous.exists()
