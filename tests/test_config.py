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


# ---------------------------------------------------------------------------------------------
# Every setting documented: descriptions, --help's listing, the documented --print-config
# ---------------------------------------------------------------------------------------------


def _models_reachable(annotation, seen):
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                _models_reachable(field.annotation, seen)
    for arg in get_args(annotation):
        _models_reachable(arg, seen)
    return seen


def test_every_field_of_every_config_has_a_description():
    models = set()
    for schema in SCHEMAS.values():
        _models_reachable(schema, models)
    assert {m.__name__ for m in models} >= {"LoraConfig", "RolloutConfig", "PPOSection", "PipelineStages", "RMEvalConfig"}
    missing = sorted(f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
                     if not (field.description or "").strip())
    assert missing == [], f"fields without a description: {missing}"


def test_reachable_models_include_optional_and_nested_ones():
    # the walk above must see inside X | None and nested sections, or it would pass on undocumented fields
    from m1_align.config import LoraConfig, PipelineConfig, SFTConfig

    seen = _models_reachable(PipelineConfig, set())
    assert SFTConfig in seen and LoraConfig in seen


SHIPPED = [("sft", "configs/sft.yaml"), ("tdpo", "configs/tdpo.yaml"), ("elo", "configs/elo.yaml"),
           ("ppo", "configs/ppo.yaml"), ("grpo", "configs/grpo.yaml"), ("rm", "configs/rm.yaml"),
           ("pipeline", "configs/quickstart.yaml"), ("pipeline", "configs/smollm2.yaml")]


@pytest.mark.parametrize(("stage", "path"), [(s, None) for s in sorted(SCHEMAS)] + SHIPPED)
def test_documented_config_loads_back_to_the_same_config(stage, path, tmp_path):
    from m1_align.config import documented_config

    cfg = load_config(stage, path, ["seed=7"] if stage != "rm-eval" else [])
    printed = write(tmp_path, "printed.yaml", documented_config(cfg, "header"))
    again = load_config(stage, printed)
    assert again == cfg
    # what a pipeline's stage leaves out is wired by the pipeline, so it must stay left out
    if stage == "pipeline":
        from m1_align.pipeline import stage_configs

        for name in type(cfg.stages).model_fields:
            ours, theirs = getattr(cfg.stages, name), getattr(again.stages, name)
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours.model_fields_set == theirs.model_fields_set
        assert stage_configs(again) == stage_configs(cfg)


def test_documented_config_puts_each_description_above_its_key():
    from m1_align.config import documented_config

    cfg = load_config("sft", None, ["train.learning_rate=1e-3"])
    lines = documented_config(cfg, "").splitlines()
    at = lines.index("  learning_rate: 0.001")
    # the changed value names its default; the comment block ends right above the key
    assert lines[at - 1].endswith("(default: 2.0e-05)") and lines[at - 2].strip().startswith("# Peak learning rate")
    assert lines[lines.index("  batch_size: 8") - 1].strip().startswith("#")
    assert "(default:" not in lines[lines.index("  batch_size: 8") - 1]  # unchanged: no default repeated
    assert lines[lines.index("sft:") - 1] == "# Supervised fine-tuning on conversations."
    assert all(len(line) <= 100 for line in lines)


def test_pipeline_stages_print_only_what_they_set(tmp_path):
    from m1_align.config import documented_config

    cfg = load_config("pipeline", write(tmp_path, "p.yaml", "stages:\n  sft: {}\n  tdpo:\n    model: {dtype: float32}\n"))
    text = documented_config(cfg, "")
    stages = text.split("\nstages:")[1].split("\n\n")[0]
    assert "  sft: {}" in stages and "    model:\n" in stages and "      dtype: float32" in stages
    assert "output_dir" not in stages.split("  tdpo:")[1]  # the pipeline sets it: printing it would pin it


@pytest.mark.parametrize("value", ["\nAnswer:", "yes", "null", "1e-5", "", "a: b", "#x", None, True, 0.1, 2e-5, [],
                                   ["a b", "c"], [0.9, 0.95]])
def test_yaml_value_loads_back(value):
    from m1_align.config import yaml_value

    text = yaml_value(value)
    assert "\n" not in text and yaml.safe_load(f"key: {text}") == {"key": value}


def test_a_stage_section_default_survives_a_partial_section(tmp_path):
    # tdpo samples its pairs at 0.7 and eval decodes greedily: setting one other rollout key keeps that
    tdpo = load_config("tdpo", write(tmp_path, "t.yaml", "rollout:\n  top_p: 0.9\n"))
    assert (tdpo.rollout.temperature, tdpo.rollout.max_new_tokens, tdpo.rollout.top_p) == (0.7, 96, 0.9)
    assert load_config("eval", None, ["rollout.engine=hf"]).rollout.temperature == 0.0
    grpo = load_config("grpo", None, ["ppo.clip_range=0.3"])
    assert (grpo.ppo.advantage_estimator, grpo.ppo.samples_per_prompt, grpo.ppo.clip_range) == ("grpo", 4, 0.3)
    assert load_config("tdpo", None, ["rollout.temperature=1.0"]).rollout.temperature == 1.0  # a set key wins
    assert load_config("elo", None, ["rollout.top_p=0.9"]).rollout.temperature == 1.0  # elo's is the class default


def test_help_lists_every_key_with_type_default_and_description():
    from m1_align.config import GRPOConfig, _known_keys, section_docs, settings_help

    text = settings_help(GRPOConfig, width=100)
    keys = [doc.key for section in section_docs(GRPOConfig) for doc in section.fields]
    known = _known_keys(GRPOConfig)
    optional = {"data.medcalc"}  # an optional section: its own key (null: off) and, below, its keys
    assert sorted(keys) == sorted(k for k in known if k in optional or not any(o.startswith(k + ".") for o in known))
    for key in keys:
        assert f"\n  {key}=" in text
    titles = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ") and ":" in line]
    assert titles == ["settings", "top level", "model", "model.lora", "data", "data.medcalc", "train", "ppo", "reward",
                      "reward.hacking", "rollout"]
    # the stage's own defaults, not the section class's
    entry = text[text.index("\n  ppo.kl_loss_coef=") :]
    assert entry.startswith("\n  ppo.kl_loss_coef=FLOAT >= 0\n") and "(default: 0.01)" in entry.split("\n  ppo.")[1]
    tdpo = settings_help(SCHEMAS["tdpo"], width=100)
    assert "(default: 0.7)" in tdpo[tdpo.index("rollout.temperature=") :].split("\n  rollout.")[0]
    assert "  model.lora.dropout=FLOAT in [0, 1)" in text and "  rollout.top_p=FLOAT in (0, 1]" in text
    assert "  train.report_to=[{tensorboard,wandb},...]" in text and "  model.path=STR|null" in text
    assert all(len(line) <= 100 for line in text.splitlines() if " " in line.strip())


@pytest.mark.parametrize(
    ("stage", "override", "unknown", "hint"),
    [
        ("grpo", "grpo.advantage_estimator=rloo", "grpo", "did you mean 'ppo.advantage_estimator'?"),
        ("sft", "lora.enabled=true", "lora", "did you mean 'model.lora.enabled'?"),
        ("ppo", "ppo.seed=3", "ppo.seed", "did you mean 'seed' or 'data.seed'?"),
        ("pipeline", "sft.train.learning_rate=0.1", "sft", "did you mean 'stages.sft.train.learning_rate'?"),
        ("sft", "train.lerning_rate=0.1", "train.lerning_rate", "did you mean 'train.learning_rate'?"),  # a typo
    ],
)
def test_a_key_in_the_wrong_section_points_at_the_right_one(stage, override, unknown, hint):
    with pytest.raises(ConfigError) as err:
        load_config(stage, None, [override])
    assert str(err.value) == f"unknown key '{unknown}' in the defaults + command line; {hint}"
