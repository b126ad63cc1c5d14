"""`m1-align pipeline`: pretrain -> SFT -> ELO -> TDPO -> RM -> PPO / GRPO in one run directory.

Each stage reads the previous stage's output, is evaluated when it finishes, and is skipped on a
re-run once finished (its result.json exists); an interrupted stage resumes from its checkpoint.
At the end run_dir/report.md gathers every stage's metrics, curves and timings. Every stage's inputs are
checked before the first stage runs (check_stages); data files belong to a stage (stages.X.data.train_file):
the pipeline's own data.train_file would reach every stage, each reading its own shape.
"""

from __future__ import annotations

import time
from pathlib import Path

from m1_align.config import ConfigError, PipelineConfig, StageConfig, dump_config
from m1_align.evaluation.run import POLICY_STAGES
from m1_align.runs import StageResult, atomic_write_text
from m1_align.stages import STAGES

ORDER = ("pretrain", "sft", "elo", "tdpo", "rm", "ppo", "grpo")
RL_STAGES = ("ppo", "grpo")  # each starts from the last policy before RL, not from the other


def stage_configs(cfg: PipelineConfig) -> dict[str, StageConfig]:
    """Fill in what each stage takes from the pipeline and from the stages before it."""
    run_dir = Path(cfg.run_dir)
    out: dict[str, StageConfig] = {}
    policy = None  # output dir of the last policy stage
    for name in ORDER:
        stage = getattr(cfg.stages, name)
        if stage is None:
            continue
        update: dict = {}
        if "output_dir" not in stage.model_fields_set:
            update["output_dir"] = str(run_dir / name)
        if "seed" not in stage.model_fields_set:
            update["seed"] = cfg.seed
        # field by field: `stages.grpo.data.tasks=[...]` keeps the pipeline's build (and so its held-out split)
        update["data"] = cfg.data.model_copy(update={k: getattr(stage.data, k) for k in stage.data.model_fields_set})
        stage = stage.model_copy(update=update)
        if name != "pretrain" and stage.model.path in (None, "previous"):
            if policy is None:
                raise ConfigError(f"pipeline stage {name} has no model: set stages.{name}.model.path or add a stage before it")
            stage = stage.model_copy(update={"model": stage.model.model_copy(update={"path": policy})})
        if name in RL_STAGES and stage.reward.model is None and "rm" in out:
            stage = stage.model_copy(update={"reward": stage.reward.model_copy(update={"model": out["rm"].output_dir})})
        out[name] = stage
        if name in POLICY_STAGES and name not in RL_STAGES:
            policy = stage.output_dir
    return out


def resolved(cfg: PipelineConfig, configs: dict[str, StageConfig]) -> PipelineConfig:
    """The pipeline with each stage's wiring written out (output_dir, model.path, reward.model, seed,
    data): run_dir/config.yaml then says where each stage started from and loads back to the same run."""
    return cfg.model_copy(update={"stages": cfg.stages.model_copy(update=configs)})


def select(names: list[str], only: str | None, start: str | None) -> tuple[list[str], set[str]]:
    """Stages to consider and stages to force re-running (--only / --from)."""
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: not a stage of this pipeline ({', '.join(names)})")
    if only:
        return [only], {only}
    if start:
        return names, set(names[names.index(start) :])
    return names, set()


def check_stages(cfg: PipelineConfig, configs: dict[str, StageConfig], names: list[str], forced: set[str]) -> None:
    """Every stage that will run, its inputs checked before the first one starts and before anything is
    written: a bad TDPO file fails in seconds, not after SFT and ELO have run for an hour. A model that an
    earlier stage of this run writes is not there yet, so only the stages' own inputs are looked for."""
    from m1_align.data.user_data import DataError
    from m1_align.training import ModelPathError, check_inputs, split_difference, split_refusal

    pending = [name for name in names if name in forced or StageResult.load(configs[name].output_dir) is None]
    made_here = {configs[name].output_dir for name in pending}
    for name in pending:
        stage = configs[name]
        source = next((other for other in pending if configs[other].output_dir == stage.model.path), None)
        differences = split_difference(stage.data, configs[source].data.model_dump()) if source else []
        if differences:  # the model is not written yet: compare with the config of the stage that writes it
            raise ConfigError(f"stages.{name}: " + split_refusal(differences, f"stage {source}, whose model it starts from,"))
        try:
            check_inputs(stage, made_here)
        except DataError as e:
            field = getattr(e, "field", None)
            if field and getattr(cfg.data, field) and field not in getattr(cfg.stages, name).data.model_fields_set:
                raise DataError(f"stages.{name} reads the pipeline's {e}; a pipeline-level data.{field} goes to every "
                                f"stage, and each reads its own shape: give this stage its file with "
                                f"stages.{name}.data.{field}=FILE") from None
            raise DataError(f"stages.{name}: {e}") from None
        except (ConfigError, ModelPathError) as e:
            raise type(e)(f"stages.{name}: {e}") from None


def run(cfg: PipelineConfig, only: str | None = None, start: str | None = None) -> StageResult:
    begin = time.time()
    run_dir = Path(cfg.run_dir)
    configs = stage_configs(cfg)
    names, forced = select(list(configs), only, start)
    check_stages(cfg, configs, names, forced)  # nothing is written before every stage's inputs are found good
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(resolved(cfg, configs)))
    timings: dict[str, float] = {}
    reported = [n for n in ORDER if n in configs]
    if "pretrain" not in configs:  # a pretrained starting model: evaluate it as the "base" column
        first = next(iter(configs))
        _evaluate_base(cfg, configs[first], forced=first in forced)
        reported.insert(0, "base")
    for i, name in enumerate(names, 1):
        stage = configs[name]
        done = StageResult.load(stage.output_dir)
        if done is not None and name not in forced:
            print(f"[{i}/{len(names)}] {name}: finished earlier in {stage.output_dir} ({done.seconds:.0f}s), skipped")
            timings[name] = done.seconds
            if not (Path(stage.output_dir) / "eval" / "eval.json").is_file():  # interrupted during its evaluation
                _evaluate(cfg, name, stage)
            continue
        if name in forced:
            stage = stage.model_copy(update={"overwrite": True})
        print(f"[{i}/{len(names)}] {name}: running -> {stage.output_dir} (pipeline time so far {time.time() - begin:.0f}s)")
        result = STAGES[name].run(stage)
        timings[name] = result.seconds
        print(result.summary())
        _evaluate(cfg, name, stage)

    from m1_align.evaluation.report import write_run_report

    report = write_run_report(run_dir, reported)
    metrics = {"report": str(report), **{f"seconds/{k}": v for k, v in timings.items()}}
    result = StageResult("pipeline", str(run_dir), metrics, time.time() - begin)
    print(f"report: {report}")
    return result


def _evaluate_base(cfg: PipelineConfig, first: StageConfig, forced: bool) -> None:
    """The starting model under the same evaluation as every stage, once (run_dir/base/eval)."""
    out = Path(cfg.run_dir) / "base" / "eval"
    if (out / "eval.json").is_file() and not forced:
        print(f"base: evaluated earlier ({out}), skipped")
        return
    print(f"base: evaluating the starting model {first.model.path} -> {out}")
    _run_eval(cfg, first.model.path, out)


def _evaluate(cfg: PipelineConfig, name: str, stage: StageConfig) -> None:
    """The same held-out evaluation after every policy stage, so the report compares like with like."""
    if name in POLICY_STAGES:
        _run_eval(cfg, stage.output_dir, Path(stage.output_dir) / "eval")


def _run_eval(cfg: PipelineConfig, model_path: str, out: Path) -> None:
    from m1_align.evaluation.run import run as run_eval

    run_eval(cfg.eval.model_copy(update={"model": cfg.eval.model.model_copy(update={"path": model_path}),
                                         "data": cfg.data, "output_dir": str(out), "overwrite": True}))
