"""`m1-align`: subcommands -> stage runners. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import sys

from m1_align.config import ConfigError, dump_config, load_config

# Subcommand -> (runner "module:function", one-line help). A runner of None is a stage that is
# not built yet: the CLI says so and exits non-zero instead of pretending.
STAGES: dict[str, tuple[str | None, str]] = {
    "pretrain": ("m1_align.sft.pretrain:run", "train the tokenizer and a tiny hybrid base model on the medical corpus"),
    "sft": ("m1_align.sft.trainer:run", "supervised fine-tuning on conversations (loss on assistant tokens)"),
    "elo": ("m1_align.rl.elo:run", "exploratory log-likelihood optimisation over sampled reasoning paths (issue #9)"),
    "tdpo": ("m1_align.preference.trainer:run", "token-level DPO (TDPO1/TDPO2) or plain DPO on preference pairs"),
    "ppo": ("m1_align.rl.ppo:run", "PPO with rule rewards and the medical reward model, vLLM rollouts (issue #10)"),
    "rm": ("m1_align.reward_models.trainer:run", "train a Bradley-Terry reward model on preference pairs (issue #7)"),
    "rm-eval": (None, "evaluate a reward model: accuracy, calibration, length bias (issue #7)"),
    "eval": (None, "held-out medical evaluation of a model or run dir (issue #11)"),
    "pipeline": (None, "pretrain -> SFT -> ELO -> TDPO -> RM -> PPO, evaluated after every stage (issue #11)"),
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML experiment config (may inherit with `defaults:`)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    parser.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m1-align",
        description="Post-training for medical language models (Baichuan-M1 recipe): SFT, ELO, TDPO, PPO.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in STAGES.items():
        _add_config_args(sub.add_parser(name, help=help_text, description=help_text))
    data = sub.add_parser("data", help="build or show the offline medical datasets", description="build or show the offline medical datasets")
    data.add_argument("action", choices=["build", "show"])
    _add_config_args(data)
    return parser


def _load(stage: str, args: argparse.Namespace):
    # `m1-align sft key=value` (no file) is allowed: the first positional is then an override.
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    return load_config(stage, args.config, args.overrides)


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    config = _load(stage, args)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    target = STAGES[stage][0]
    if target is None:
        print(f"m1-align {stage}: this stage is not built yet ({STAGES[stage][1]}); nothing was run.", file=sys.stderr)
        return 2
    module_name, func = target.split(":")
    runner = getattr(importlib.import_module(module_name), func)
    result = runner(config)
    print(result.summary())
    return 0


def _run_data(args: argparse.Namespace) -> int:
    config = _load("data", args)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from m1_align.data import build_from_config, show

    out_dir = build_from_config(config.data)
    if args.action == "show":
        print(show(out_dir))
    else:
        print(f"built datasets in {out_dir} (manifest: {out_dir}/manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            return _run_data(args)
        return _run_stage(args.command, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
