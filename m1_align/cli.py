"""`m1-align`: subcommands -> stage runners. Nothing else lives here."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from pathlib import Path

from m1_align.config import (
    SCHEMAS,
    ConfigError,
    DataStageConfig,
    documented_config,
    load_config,
    load_data_config,
    settings_help,
)
from m1_align.model.upcycle import options_help
from m1_align.stages import STAGES

PIPELINE_HELP = "pretrain -> SFT -> ELO -> TDPO -> RM -> PPO / GRPO, evaluated after every stage"


# Raised for bad input (paths, data files, finished outputs, missing data packages), not for bugs.
USER_ERRORS = {"OutputExistsError", "OutputDirError", "ModelPathError", "DataError", "MissingSourceError", "LeakError",
               "UserInputError", "GGUFImportError", "DivergedError", "IncompleteCheckpointError", "AdapterError",
               "StaleWeightsError", "UpcycleError"}
DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded")
# what torch's and safetensors' writers say when a write fails half-way; a full disk if the disk is full
WRITE_FAILED = ("file write failed", "iostream error", "unexpected pos")


def _free_bytes(path: str | None) -> int | None:
    if not path:
        return None
    folder = Path(path).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _user_message(err: BaseException, output_dir: str | None = None) -> str | None:
    """One line for an error the user can fix, or None to keep the traceback (a bug)."""
    if isinstance(err, ConfigError) or type(err).__name__ in USER_ERRORS:
        return str(err)
    chain, cause = [], err
    while cause is not None:  # torch raises its own error in place of the failed write's
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    texts = " ".join(str(e) for e in chain)
    no_space = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain) or any(
        s in texts for s in DISK_FULL)
    free = _free_bytes(output_dir)
    if no_space or (any(s in texts for s in WRITE_FAILED) and free is not None and free < 64 * 2**20):
        where = next((e.filename for e in chain if getattr(e, "filename", None)), None) or output_dir or "the output folder"
        left = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return f"disk full writing {where}{left}: free space (df -h) or set output_dir on another disk, then run the same command to resume"
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and err.filename:
        return f"cannot write {err.filename} ({err.strerror}); choose an output_dir you can write to"
    return None


PRINT_CONFIG_HELP = ("print the merged, validated config as YAML, each key's description as a comment above it, "
                     "and exit: a documented starting file that loads back to the same config")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment config (may inherit with `defaults:`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)


def _add_model_first_args(parser: argparse.ArgumentParser, reward_model: bool) -> None:
    """eval and rm-eval: a model folder first (sets model.path), then a config, then overrides."""
    what = "a reward model folder or finished rm stage" if reward_model else "a model folder, stage output or run dir"
    parser.add_argument("inputs", nargs="*", metavar="[MODEL_PATH] [CONFIG] [key=value ...]",
                        help=f"{what} (sets model.path), a YAML config, overrides")
    if reward_model:
        parser.add_argument("--data", help="pairs to score: JSONL, Parquet or a datasets folder (sets data.eval_file)")
        parser.add_argument("--output", help="report folder (sets output_dir)")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m1-align",
        description="Post-training for medical language models (Baichuan-M1 recipe): SFT, ELO, TDPO, PPO, GRPO. "
                    "`m1-align COMMAND --help` lists every setting of a command with its default.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # the settings' help goes in as written: argparse would reflow its columns
    documented = {"formatter_class": argparse.RawDescriptionHelpFormatter}
    commands = {**{name: stage.help for name, stage in STAGES.items()}, "pipeline": PIPELINE_HELP}
    for name, help_text in commands.items():
        stage = sub.add_parser(name, help=help_text, description=help_text, epilog=settings_help(SCHEMAS[name]),
                               **documented)
        if name in ("eval", "rm-eval"):
            _add_model_first_args(stage, reward_model=name == "rm-eval")
        else:
            _add_config_args(stage)
        if name == "pipeline":
            stage.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and every later one")
            stage.add_argument("--only", metavar="STAGE", help="re-run only this stage")
    data = sub.add_parser("data", help="build or show the offline medical datasets",
                          description="build or show the offline medical datasets; reads the data section of any "
                                      "stage or pipeline config", epilog=settings_help(DataStageConfig, {"data"}),
                          **documented)
    data.add_argument("action", choices=["build", "show"])
    _add_config_args(data)
    gguf = sub.add_parser("import-gguf", help="turn a GGUF file (or the bundled SmolLM2: smollm2) into a HF model folder",
                          description="turn a GGUF file into a Hugging Face model folder, checked by a log-prob probe")
    gguf.add_argument("gguf", help="a .gguf file, or a bundled model: smollm2 (SmolLM2-135M-Instruct)")
    gguf.add_argument("output_dir", help="the Hugging Face model folder to write")
    gguf.add_argument("--overwrite", action="store_true", help="replace a model already in output_dir")
    upcycle = sub.add_parser("upcycle", help="turn a Llama checkpoint (SmolLM2...) into a Baichuan-M1 hybrid folder",
                             description="turn a Llama checkpoint into a baichuan_m1 hybrid: the same weights, "
                                         "sliding-window layers, the K/V conv at identity, the NormHead; what is "
                                         "function-preserving is listed in m1_align/model/upcycle.py",
                             epilog="options (key=value):\n" + options_help(), **documented)
    upcycle.add_argument("source", help="a Hugging Face LlamaForCausalLM folder")
    upcycle.add_argument("output_dir", help="the hybrid model folder to write")
    upcycle.add_argument("options", nargs="*", metavar="key=value", help="window, sliding_layers, head (below)")
    upcycle.add_argument("--overwrite", action="store_true", help="replace what output_dir holds")
    return parser


def print_config(command: str, config, sections: set[str] | None = None) -> None:
    header = (f"m1-align {command}: the merged, validated config, every key with its description; "
              f"`m1-align {command} FILE.yaml` loads this file back to the same config.")
    print(documented_config(config, header, sections), end="")


def _load(stage: str, args: argparse.Namespace):
    # `m1-align sft key=value` (no file) is allowed: the first positional is then an override.
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    return load_config(stage, args.config, args.overrides)


def _split_inputs(args: argparse.Namespace) -> None:
    """eval / rm-eval positionals: a leading folder is the model path, then a config, then overrides."""
    inputs = list(args.inputs)
    args.config, args.overrides = None, []
    first = inputs[0] if inputs else ""
    # a path that is not there is the model too unless named as YAML, so its error names the model path
    if first and (Path(first).is_dir() or not ("=" in first or Path(first).exists() or first.endswith((".yaml", ".yml")))):
        args.overrides.append(f"model.path={inputs.pop(0)}")
    if inputs and "=" not in inputs[0]:
        args.config = inputs.pop(0)
    args.overrides += inputs
    if getattr(args, "data", None):
        args.overrides.append(f"data.eval_file={args.data}")
    if getattr(args, "output", None):
        args.overrides.append(f"output_dir={args.output}")


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    if stage in ("eval", "rm-eval"):
        _split_inputs(args)
    config = _load(stage, args)
    args.output_hint = getattr(config, "output_dir", None) or getattr(config, "run_dir", None)
    if args.print_config:
        if stage == "pipeline":  # what will run: each stage with its run-dir folder, starting model and data
            from m1_align.pipeline import resolved, stage_configs

            config = resolved(config, stage_configs(config))
        print_config(stage, config)
        return 0
    if stage == "pipeline":
        from m1_align.pipeline import run as run_pipeline

        result = run_pipeline(config, only=args.only, start=args.from_stage)
    else:
        result = STAGES[stage].run(config)
    if os.environ.get("RANK", "0") == "0":  # one summary, not one per process
        print(result.summary())
    return 0


def _run_data(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    config = load_data_config(args.config, args.overrides)  # the data section of any stage or pipeline config
    if args.print_config:
        print_config(f"data {args.action}", config, {"data"})
        return 0
    from m1_align.data.build import build_from_config, show

    out_dir = build_from_config(config.data)
    if args.action == "show":
        print(show(out_dir))
    else:
        print(f"built datasets in {out_dir} (manifest: {out_dir}/manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes positionals only before the first option: overrides after `--only sft` come back unparsed
    args, rest = parser.parse_known_args(argv)
    positional = "overrides" if hasattr(args, "overrides") else "inputs"
    if rest and (any(a.startswith("-") for a in rest) or not hasattr(args, positional)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        getattr(args, positional).extend(rest)
    # the trainers' own progress bars stay; per-map bars of `datasets` are noise here
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.command != "data" and os.environ.get("M1_ALIGN_KEEP_FREED_MEMORY", "1") != "0":
        from m1_align.training import keep_freed_memory

        keep_freed_memory()
    try:
        if args.command == "data":
            return _run_data(args)
        if args.command == "import-gguf":
            from m1_align.model.gguf_import import import_gguf

            report = import_gguf(args.gguf, args.output_dir, args.overwrite)
            print(f"imported {report['architecture']} ({report['parameters'] / 1e6:.1f}M parameters) into {args.output_dir}; "
                  f"probe max |log-prob diff| {report['probe_max_abs_logprob_diff']:.1e} over {report['probe_tokens']} tokens")
            return 0
        if args.command == "upcycle":
            from m1_align.model.upcycle import parse_options, upcycle

            report = upcycle(args.source, args.output_dir, parse_options(args.options), args.overwrite)
            print(f"upcycled {args.source} into {args.output_dir} ({report['parameters'] / 1e6:.1f}M parameters, "
                  f"sliding layers {report['sliding_window_layers']}, window {report['options']['window']}, "
                  f"{report['options']['head']} head); probe KL to the source {report['kl_to_source_mean']:.4f} "
                  f"nats/token over {report['probe_tokens']} tokens")
            return 0
        return _run_stage(args.command, args)
    except Exception as err:  # errors a user can fix get one line; anything else keeps its traceback
        message = _user_message(err, getattr(args, "output_hint", None))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
