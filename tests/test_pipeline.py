"""The whole chain on the smallest settings: every artefact, skip on re-run, --only/--from, resume
after an interruption mid-stage."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_DATA

from m1_align.config import PipelineConfig, load_config

STAGES = ("pretrain", "sft", "elo", "tdpo", "rm", "ppo")


def smallest(tmp_path, data_cache, run_dir):
    overrides = [
        f"run_dir={run_dir}",
        f"data.cache_dir={data_cache}",
        *(f"data.{k}={v}" for k, v in SMALL_DATA.items()),
        "eval.eval.limit=2", "eval.eval.mmlu_limit=2", "eval.eval.max_new_tokens=8",
        "stages.pretrain.model.preset=tiny", "stages.pretrain.pretrain.vocab_size=512",
        "stages.pretrain.pretrain.heldout_texts=16",
        "stages.pretrain.train.max_steps=3", "stages.sft.train.max_steps=3", "stages.elo.train.max_steps=2",
        "stages.tdpo.train.max_steps=2", "stages.rm.train.max_steps=2", "stages.ppo.train.max_steps=2",
        "stages.elo.train.save_steps=1",
        *(f"stages.{s}.train.eval_limit=2" for s in ("sft", "elo", "tdpo", "ppo")),
        *(f"stages.{s}.rollout.max_new_tokens=16" for s in ("elo", "ppo")),
    ]
    return load_config("pipeline", "configs/quickstart.yaml", overrides)


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, data_cache, monkeypatch, capsys):
    from m1_align import pipeline
    from m1_align.rl.elo import ELOLoop

    run_dir = tmp_path / "run"
    cfg: PipelineConfig = smallest(tmp_path, data_cache, run_dir)

    # interrupted in the middle of ELO: the stages before it are finished, ELO has a checkpoint
    original = ELOLoop.step

    def interrupt_at_step_2(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return original(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(ELOLoop, "step", interrupt_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(cfg)
    assert (run_dir / "sft" / "result.json").is_file() and not (run_dir / "elo" / "result.json").exists()
    assert (run_dir / "elo" / "checkpoint" / "state.json").is_file()

    pipeline.run(cfg)  # resumes ELO at its checkpoint, then runs the rest
    out = capsys.readouterr().out
    assert "pretrain: finished earlier in" in out and "sft: finished earlier in" in out
    elo_steps = [json.loads(line)["step"] for line in (run_dir / "elo" / "metrics.jsonl").read_text().splitlines()
                 if "time/sample" in line]
    assert elo_steps == [1, 2]

    for stage in STAGES:
        folder = run_dir / stage
        for name in ("result.json", "metrics.jsonl", "eval.json", "model/config.json", "model/model.safetensors"):
            assert (folder / name).is_file(), f"{stage}/{name} missing"
        if stage != "rm":
            assert (folder / "eval" / "eval.json").is_file(), f"{stage} was not evaluated"
    report = (run_dir / "report.md").read_text()
    assert "| metric | pretrain | sft | elo | tdpo | rm | ppo |" in report
    for plot in ("heldout_accuracy", "trainer_accuracy", "loss", "reward", "kl"):
        assert (run_dir / "plots" / f"{plot}.png").is_file() and f"(plots/{plot}.png)" in report
    assert (run_dir / "pretrain" / "tokenizer" / "tokenizer.json").is_file()

    # a finished run is skipped; --only re-runs one stage, --from re-runs a stage and the ones after it
    # (a finished stage whose evaluation was interrupted is evaluated, not retrained)
    before = {s: json.loads((run_dir / s / "result.json").read_text())["seconds"] for s in STAGES}
    (run_dir / "sft" / "eval" / "eval.json").unlink()
    pipeline.run(cfg)
    assert {s: json.loads((run_dir / s / "result.json").read_text())["seconds"] for s in STAGES} == before
    assert (run_dir / "sft" / "eval" / "eval.json").is_file()
    pipeline.run(cfg, only="rm")
    after_only = {s: json.loads((run_dir / s / "result.json").read_text())["seconds"] for s in STAGES}
    assert [s for s in STAGES if after_only[s] != before[s]] == ["rm"]
    pipeline.run(cfg, start="rm")
    after_from = {s: json.loads((run_dir / s / "result.json").read_text())["seconds"] for s in STAGES}
    assert [s for s in STAGES if after_from[s] != after_only[s]] == ["rm", "ppo"]
    with pytest.raises(Exception, match="not a stage of this pipeline"):
        pipeline.run(cfg, only="dpo")


def test_every_shipped_config_validates():
    from pathlib import Path

    from m1_align.config import load_config

    schema_of = {"sft": "sft", "tdpo": "tdpo", "elo": "elo", "ppo": "ppo", "rm": "rm", "grpo": "grpo", "smollm2": "pipeline", "smollm2-medcalc": "pipeline",
                 "data": "data"}
    for path in sorted(Path("configs").rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue
        stage = "pipeline" if "pipeline" in path.name or "quickstart" in path.name else schema_of.get(path.stem)
        assert stage, f"no schema for {path}"
        load_config(stage, path)


def test_a_stage_data_override_keeps_the_pipelines_other_data_settings():
    """Setting one data field of a stage must not reset the rest to the defaults: a different build would
    bring a different held-out split, so the stages' evaluations would stop comparing like with like."""
    from m1_align import pipeline

    cfg = load_config("pipeline", "configs/smollm2.yaml", ["data.max_per_task=77", "stages.grpo.data.tasks=[elixhauser]"])
    configs = pipeline.stage_configs(cfg)
    assert configs["grpo"].data.tasks == ["elixhauser"] and configs["sft"].data.tasks is None
    assert configs["grpo"].data.max_per_task == configs["sft"].data.max_per_task == 77
    assert configs["grpo"].data.eval_per_task == cfg.data.eval_per_task


def test_the_dumped_run_config_loads_back_to_the_same_stage_wiring(tmp_path):
    """run_dir/config.yaml is the record of a run: loading it must give every stage the same output_dir,
    starting model and reward model, not the stage defaults (runs/default, no model)."""
    from m1_align import pipeline
    from m1_align.config import dump_config

    cfg = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={tmp_path / 'run'}", "seed=7"])
    configs = pipeline.stage_configs(cfg)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_config(pipeline.resolved(cfg, configs)))
    again = pipeline.stage_configs(load_config("pipeline", dumped))
    assert list(again) == list(configs)
    for name, stage in configs.items():
        assert again[name] == stage, name
    assert again["tdpo"].model.path == str(tmp_path / "run" / "elo") and again["grpo"].seed == 7


@pytest.mark.slow
def test_pipeline_from_a_pretrained_model_evaluates_it_as_base_and_runs_grpo_beside_ppo(tmp_path, data_cache, tiny_llama_dir):
    """The real-model recipe's shape (configs/smollm2.yaml): no pretrain, LoRA, ppo and grpo both from tdpo."""
    from m1_align import pipeline

    run_dir = tmp_path / "run"
    steps = {"sft": 2, "elo": 1, "tdpo": 1, "rm": 1, "ppo": 1, "grpo": 1}
    overrides = [
        f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *(f"data.{k}={v}" for k, v in SMALL_DATA.items()),
        f"stages.sft.model.path={tiny_llama_dir}",
        "eval.eval.limit=2", "eval.eval.mmlu_limit=2", "eval.eval.mmlu_generation_limit=1", "eval.eval.max_new_tokens=8",
        *(f"stages.{s}.train.max_steps={n}" for s, n in steps.items()),
        *(f"stages.{s}.train.eval_limit=1" for s in steps if s != "rm"),
        *(f"stages.{s}.rollout.max_new_tokens=16" for s in ("elo", "ppo", "grpo")),
        "stages.elo.elo.drop_degenerate=false",
        # a random model answers nothing right, so it has no pairs of its own (tests/test_on_policy_pairs.py)
        "stages.tdpo.tdpo.pairs=built",
    ]
    cfg = load_config("pipeline", "configs/smollm2.yaml", overrides)
    configs = pipeline.stage_configs(cfg)
    assert configs["ppo"].model.path == configs["grpo"].model.path == str(run_dir / "tdpo")
    assert configs["grpo"].reward.model == str(run_dir / "rm")
    pipeline.run(cfg)
    assert (run_dir / "base" / "eval" / "eval.json").is_file()
    for stage in steps:
        assert (run_dir / stage / "result.json").is_file()
    header = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| metric |"))
    assert header.startswith("| metric | base | sft | elo | tdpo | rm | ppo | grpo |")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_stage_is_checked_before_the_first_runs_and_before_anything_is_written(tmp_path, tiny_llama_dir):
    """A bad file for TDPO stops the run at once, not after SFT and ELO; the run folder stays untouched. The
    models the earlier stages will write do not exist yet and are not looked for."""
    from m1_align import pipeline

    run_dir = tmp_path / "run"
    good = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={run_dir}", f"stages.sft.model.path={tiny_llama_dir}"])
    configs = pipeline.stage_configs(good)
    pipeline.check_stages(good, configs, list(configs), set())  # elo..grpo start from models not written yet

    questions = _write_jsonl(tmp_path / "questions.jsonl", [{"prompt": "ICD-10 code for essential hypertension?", "answer": "I10"}])
    bad = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={run_dir}", f"stages.sft.model.path={tiny_llama_dir}",
                                                           "stages.tdpo.tdpo.pairs=built", f"stages.tdpo.data.train_file={questions}"])
    with pytest.raises(Exception, match=r"^stages\.tdpo: data\.train_file: questions\.jsonl line 1: missing keys chosen, rejected"):
        pipeline.run(bad)
    assert not run_dir.exists()

    no_model = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={run_dir}", f"stages.sft.model.path={tmp_path / 'nowhere'}"])
    with pytest.raises(Exception, match=r"^stages\.sft: model path .*nowhere holds no Hugging Face model"):
        pipeline.run(no_model)
    assert not run_dir.exists()


def test_a_pipeline_level_data_file_that_a_stage_cannot_read_names_the_stage_and_the_per_stage_form(tmp_path, tiny_llama_dir):
    from m1_align import pipeline

    conversations = _write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "What does CKD stand for?", "completion": "Chronic kidney disease"}])
    cfg = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={tmp_path / 'run'}", f"stages.sft.model.path={tiny_llama_dir}",
                                                           f"data.train_file={conversations}"])
    with pytest.raises(Exception, match=r"^stages\.elo reads the pipeline's data\.train_file: chats\.jsonl line 1: missing key "
                                        r"answer.*give this stage its file with stages\.elo\.data\.train_file=FILE$"):
        pipeline.run(cfg)
    # the per-stage form: the conversations for SFT only; the other stages keep the built data
    per_stage = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={tmp_path / 'run'}", f"stages.sft.model.path={tiny_llama_dir}",
                                                                 f"stages.sft.data.train_file={conversations}"])
    configs = pipeline.stage_configs(per_stage)
    assert configs["sft"].data.train_file == str(conversations) and configs["elo"].data.train_file is None
    pipeline.check_stages(per_stage, configs, list(configs), set())


def test_only_a_stage_the_pipeline_lacks_refuses_before_writing_the_runs_config(tmp_path):
    from m1_align import pipeline
    from m1_align.config import ConfigError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the recorded config of an earlier run\n")
    cfg = load_config("pipeline", "configs/quickstart.yaml", [f"run_dir={run_dir}"])
    for flags in ({"only": "grpo"}, {"start": "grpo"}):
        with pytest.raises(ConfigError, match="grpo: not a stage of this pipeline"):
            pipeline.run(cfg, **flags)
    assert (run_dir / "config.yaml").read_text() == "the recorded config of an earlier run\n"


def test_the_stage_configs_build_the_data_of_the_pipeline_they_continue():
    """configs/sft.yaml ... continue runs/quickstart: the same build, so the same held-out questions."""
    from m1_align.data.build import build_dir_name

    def build(stage, path):
        data = load_config(stage, path).data
        return data.cache_dir, build_dir_name(data.seed, data.max_per_task, data.eval_per_task)

    pipeline_build = build("pipeline", "configs/quickstart.yaml")
    for stage in ("sft", "elo", "tdpo", "rm", "ppo", "grpo"):
        assert build(stage, f"configs/{stage}.yaml") == pipeline_build, stage
    assert build("pipeline", "configs/smollm2.yaml") == pipeline_build
    assert build("sft", "configs/baichuan-m1-14b/sft.yaml") == build("pipeline", "configs/baichuan-m1-14b/pipeline.yaml")


def test_a_stage_whose_split_differs_from_the_stage_it_continues_is_refused_before_the_run(tmp_path, tiny_llama_dir):
    from m1_align import pipeline
    from m1_align.config import ConfigError

    cfg = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={tmp_path / 'run'}", f"stages.sft.model.path={tiny_llama_dir}",
                                                           "stages.tdpo.data.eval_per_task=50"])
    with pytest.raises(ConfigError, match=r"^stages\.tdpo: data\.eval_per_task=50, but stage elo, whose model it starts "
                                          r"from, was trained on the data built with eval_per_task 100: .*set data\.eval_per_task=100"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()


def test_pipeline_print_config_is_the_config_the_run_records(capsys, tmp_path):
    """`pipeline --print-config` shows each stage as it will run (its folder under run_dir, the model it starts
    from, the pipeline's data), which is what the run writes to run_dir/config.yaml."""
    import yaml

    from m1_align.cli import main
    from m1_align.config import PipelineConfig, dump_config, load_config
    from m1_align.pipeline import resolved, stage_configs

    run_dir = tmp_path / "run"
    assert main(["pipeline", "configs/smollm2.yaml", f"run_dir={run_dir}", "--print-config"]) == 0
    printed = PipelineConfig.model_validate(yaml.safe_load(capsys.readouterr().out))
    cfg = load_config("pipeline", "configs/smollm2.yaml", [f"run_dir={run_dir}"])
    recorded = PipelineConfig.model_validate(yaml.safe_load(dump_config(resolved(cfg, stage_configs(cfg)))))
    assert printed.model_dump() == recorded.model_dump()
    assert printed.stages.tdpo.output_dir == str(run_dir / "tdpo")
    assert printed.stages.tdpo.model.path == str(run_dir / "elo")  # the previous policy stage's model
