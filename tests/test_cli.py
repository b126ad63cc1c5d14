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


def test_stage_help_lists_every_setting_by_section(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    sections = [line.split(":")[0] for line in out.split("\nsettings:")[1].splitlines()
                if line and not line.startswith(" ") and ":" in line]
    assert sections == ["top level", "model", "model.lora", "data", "data.medcalc", "train", "ppo", "reward",
                        "reward.hacking", "rollout"]
    for entry in ("\n  ppo.advantage_estimator={gae,grpo,dr_grpo,rloo,reinforce_pp,reinforce_pp_baseline}\n", "\n  ppo.kl_coef=FLOAT >= 0\n",
                  "\n  train.learning_rate=FLOAT > 0\n", "\n  rollout.temperature=FLOAT >= 0\n"):
        assert entry in out
    gamma = out[out.index("\n  ppo.gamma=") :].split("\n  ppo.")[1]
    assert "discount" in gamma and "(default: 1.0)" in gamma


def test_pipeline_and_data_help(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    out = capsys.readouterr().out
    assert "\n  run_dir=STR" in out and "\n  stages.grpo=MAPPING|null" in out
    assert "m1-align grpo --help lists them" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    out = capsys.readouterr().out
    assert "\n  data.max_per_task=INT >= 1" in out and "train." not in out.split("settings:")[1]


def test_no_help_or_message_speaks_of_issues(capsys):
    for args in (["--help"], *([name, "--help"] for name in SUBCOMMANDS)):
        with pytest.raises(SystemExit):
            main(args if args[0] != "data" else ["data", "build", "--help"])
        assert "issue" not in capsys.readouterr().out.lower()


def test_print_config_is_documented_and_loads_back(tmp_path, capsys):
    from m1_align.config import load_config

    assert main(["sft", "configs/sft.yaml", "train.max_steps=5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# m1-align sft:") and "\n  # Loss on the assistant's tokens only" in printed
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert load_config("sft", path) == load_config("sft", "configs/sft.yaml", ["train.max_steps=5"])
    assert main(["data", "show", "configs/sft.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out).keys() == {"data"}


def test_a_section_of_another_name_is_pointed_at():
    out = run_cli("grpo", "configs/grpo.yaml", "grpo.advantage_estimator=rloo")
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: unknown key 'grpo' in configs/grpo.yaml + command line; "
                                  "did you mean 'ppo.advantage_estimator'?")
