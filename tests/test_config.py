"""Config loading: merging, overrides, inheritance and every error message a user can hit."""

import math

import pytest
import yaml

from m1_align.config import SCHEMAS, ConfigError, dump_config, load_config, parse_overrides


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_fill_every_field(tmp_path):
    cfg = load_config("sft", write(tmp_path, "x.yaml", "output_dir: runs/x\n"))
    assert cfg.output_dir == "runs/x"
    assert cfg.train.learning_rate == 2e-5
    assert cfg.sft.packing is True


def test_overrides_are_typed_and_nested(tmp_path):
    path = write(tmp_path, "x.yaml", "train:\n  learning_rate: 1.0e-4\n")
    cfg = load_config("tdpo", path, ["train.learning_rate=1e-5", "tdpo.loss=tdpo1", "model.path=/ckpt", "train.report_to=[tensorboard]"])
    assert cfg.train.learning_rate == pytest.approx(1e-5)
    assert cfg.tdpo.loss == "tdpo1"
    assert cfg.model.path == "/ckpt"
    assert cfg.train.report_to == ["tensorboard"]
    assert cfg.train.batch_size == 8  # untouched defaults survive the merge


def test_inheritance_changes_only_what_differs(tmp_path):
    write(tmp_path, "base.yaml", "seed: 7\ntrain:\n  batch_size: 4\n  learning_rate: 3.0e-5\n")
    child = write(tmp_path, "child.yaml", "defaults: base.yaml\ntrain:\n  batch_size: 2\n")
    cfg = load_config("sft", child)
    assert (cfg.seed, cfg.train.batch_size, cfg.train.learning_rate) == (7, 2, 3e-5)


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", "defaults: b.yaml\n")
    write(tmp_path, "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("sft", tmp_path / "a.yaml")


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "x.yaml", "train:\n  lerning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config("sft", path)
    assert str(err.value) == f"unknown key 'train.lerning_rate' in {path}; did you mean 'train.learning_rate'?"


def test_unknown_override_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'tdpo.alpah' .*command line; did you mean 'tdpo.alpha'\?"):
        load_config("tdpo", None, ["tdpo.alpah=0.3"])


def test_wrong_type_names_field_file_and_type(tmp_path):
    path = write(tmp_path, "x.yaml", "train:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config("sft", path)
    message = str(err.value)
    assert str(path) in message and "'train.batch_size'" in message and "integer" in message
    assert "\n" not in message


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="tdpo1.*tdpo2.*dpo"):
        load_config("tdpo", None, ["tdpo.loss=ipo"])


def test_malformed_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "x.yaml", "train:\n  learning_rate: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config("sft", path)
    assert "malformed YAML" in str(err.value) and str(path) in str(err.value) and "line" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config("sft", tmp_path / "nope.yaml")


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("sft", write(tmp_path, "x.yaml", "- a\n- b\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["train.learning_rate"])


def test_paths_must_be_plain(tmp_path):
    with pytest.raises(ConfigError, match="not a plain path"):
        load_config("sft", None, ["output_dir=runs/x; rm -rf ~"])


@pytest.mark.parametrize("stage", sorted(SCHEMAS))
def test_print_config_round_trips(stage, tmp_path):
    cfg = load_config(stage, None)
    dumped = write(tmp_path, "dump.yaml", dump_config(cfg))
    assert load_config(stage, dumped) == cfg
    assert yaml.safe_load(dumped.read_text()) == cfg.model_dump(mode="json")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.learning_rate=inf"], "finite number"),
        (["ppo.kl_coef=nan"], "finite number"),
        (["train.max_steps=3", "train.max_steps=4"], "given twice"),
        (["tdpo.beta=0.2"], "it is a key of tdpo"),
    ],
)
def test_overrides_that_would_change_meaning_silently_are_refused(overrides, message):
    stage = "ppo" if overrides[0].startswith("ppo") else "sft"
    with pytest.raises(ConfigError, match=message):
        load_config(stage, None, overrides)


def test_a_mapping_override_merges_with_dotted_ones():
    cfg = load_config("sft", None, ["train.learning_rate=0.5", "train={max_steps: 3}"])
    assert cfg.train.learning_rate == 0.5 and cfg.train.max_steps == 3


def test_data_commands_take_the_data_section_of_any_config():
    from m1_align.config import load_data_config

    cfg = load_data_config("configs/smollm2.yaml", ["data.eval_per_task=50"])
    assert cfg.data.max_per_task == 1500 and cfg.data.eval_per_task == 50


def test_a_non_finite_loss_stops_the_run_in_one_line(tmp_path):
    from types import SimpleNamespace

    from m1_align.runs import DivergedError, MetricsLogger, read_metrics
    from m1_align.training import MetricsCallback

    callback = MetricsCallback(MetricsLogger(tmp_path, run_name="sft"))
    state = SimpleNamespace(global_step=7, is_world_process_zero=True)
    callback.on_log(None, state, None, logs={"loss": 1.5, "grad_norm": 0.3})
    with pytest.raises(DivergedError, match="sft diverged at step 7: loss is nan") as err:
        callback.on_log(None, state, None, logs={"loss": float("nan")})
    assert "\n" not in str(err.value)
    assert math.isnan(read_metrics(tmp_path)[-1]["loss"])  # the NaN is in metrics.jsonl, not filtered away


def test_unknown_data_task_names_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config("grpo", None, ["data.tasks=[elixhauser,icd]"])
    assert "'data.tasks'" in str(err.value) and "icd_code" in str(err.value) and "\n" not in str(err.value)
