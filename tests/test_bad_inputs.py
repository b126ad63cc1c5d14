"""Bad input gets one line that names the file or field and the fix, before anything is written; faults
(kills, lost files, full disks) lose nothing.

To add a bad input: write a `make(tmp, good)` function that builds the broken thing under `tmp` and
returns the command line (`good` has a working model folder and the small data's overrides), then add
one `Case` to CASES with a regular expression the one-line message must match.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SMALL_DATA

from m1_align.cli import _user_message, main


@dataclass
class Good:
    model: Path  # a tiny Llama folder with a ChatML tokenizer
    data: list[str]  # overrides pointing at the session's small built data

    def model_copy(self, tmp: Path) -> Path:
        return Path(shutil.copytree(self.model, tmp / "model"))


@pytest.fixture(scope="module")
def good(tiny_llama_dir, data_cache):
    return Good(tiny_llama_dir, [f"data.cache_dir={data_cache}", *(f"data.{k}={v}" for k, v in SMALL_DATA.items())])


def sft(tmp: Path, good: Good, *overrides: str, model: Path | None = None) -> list[str]:
    return ["sft", f"output_dir={tmp / 'out'}", f"model.path={model or good.model}", *good.data, *overrides]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- the cases: each builds its broken input and returns the command line ---------------------------


def config_not_utf8(tmp, good):
    return ["sft", str(write(tmp / "c.yaml", b"train:\n  learning_rate: 1.0e-5 # caf\xe9\n"))]


def learning_rate_inf(tmp, good):
    return sft(tmp, good, "train.learning_rate=inf")


def betas_out_of_range(tmp, good):
    return sft(tmp, good, "train.adam_betas=[0.9,1.5]")


def key_given_twice(tmp, good):
    return sft(tmp, good, "train.learning_rate=1e-4", "train.learning_rate=1e-5")


def other_stages_key(tmp, good):
    return sft(tmp, good, "tdpo.beta=0.2")


def model_folder_empty(tmp, good):
    (tmp / "empty").mkdir()
    return sft(tmp, good, model=tmp / "empty")


def model_hub_id(tmp, good):
    return sft(tmp, good, model=Path("HuggingFaceTB/SmolLM2-135M-Instruct"))


def model_config_not_json(tmp, good):
    model = good.model_copy(tmp)
    write(model / "config.json", "{not json")
    return sft(tmp, good, model=model)


def unknown_model_type(tmp, good):
    model = good.model_copy(tmp)
    config = json.loads((model / "config.json").read_text())
    write(model / "config.json", json.dumps({**config, "model_type": "llama9000"}))
    return sft(tmp, good, model=model)


def truncated_weights(tmp, good):
    model = good.model_copy(tmp)
    weights = model / "model.safetensors"
    write(weights, weights.read_bytes()[: weights.stat().st_size // 2])
    return sft(tmp, good, model=model)


def truncated_stage_weights(tmp, good):
    model = Path(shutil.copytree(good.model, tmp / "sft" / "model"))
    write(model / "m1_align_config.yaml", "output_dir: sft\n")  # a stage's output: that stage can write it again
    weights = model / "model.safetensors"
    write(weights, weights.read_bytes()[:100])
    return sft(tmp, good, model=tmp / "sft")


def tokenizer_missing(tmp, good):
    model = good.model_copy(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    return sft(tmp, good, model=model)


def tokenizer_folder_empty(tmp, good):
    (tmp / "tok").mkdir()
    return sft(tmp, good, f"model.tokenizer={tmp / 'tok'}")


def output_is_a_file(tmp, good):
    write(tmp / "out", "")
    return sft(tmp, good)


def output_under_a_file(tmp, good):
    write(tmp / "afile", "")
    return ["sft", f"output_dir={tmp / 'afile' / 'run'}", f"model.path={good.model}", *good.data]


def data_not_utf8(tmp, good):
    path = write(tmp / "d.jsonl", b'{"prompt": "caf\xe9"}\n')
    return sft(tmp, good, f"data.train_file={path}")


def pairs_all_degenerate(tmp, good):
    rows = [{"prompt": "What does CKD stand for?", "chosen": "Chronic kidney disease", "rejected": "Chronic kidney disease"},
            {"prompt": "What does MI stand for?", "chosen": "Myocardial infarction", "rejected": " "}]
    return ["tdpo", *sft(tmp, good, f"data.train_file={jsonl(tmp / 'p.jsonl', rows)}")[1:]]


def pairs_for_on_policy(tmp, good):
    rows = [{"prompt": "What does CKD stand for?", "chosen": "Chronic kidney disease", "rejected": "Coronary kidney disease"}]
    return ["tdpo", *sft(tmp, good, "tdpo.pairs=on_policy", f"data.train_file={jsonl(tmp / 'p.jsonl', rows)}")[1:]]


def split_differs(tmp, good):
    model = good.model_copy(tmp)  # a model whose run built its data with 1500 rows and 100 held out per task
    write(model / "m1_align_config.yaml", "data:\n  max_per_task: 1500\n  eval_per_task: 100\n  seed: 0\n")
    return sft(tmp, good, model=model)


def unknown_rule(tmp, good):
    rows = [{"prompt": "ICD-10 code for essential hypertension?", "answer": "I10", "rule": "icd10"}]
    return ["grpo", *sft(tmp, good, f"data.train_file={jsonl(tmp / 'r.jsonl', rows)}")[1:]]


def deepspeed_config_missing(tmp, good):
    return sft(tmp, good, f"train.deepspeed={tmp / 'zero9.json'}")


def eval_run_missing(tmp, good):
    return ["eval", str(tmp / "runs" / "missing"), f"output_dir={tmp / 'out'}", *good.data]


def rm_eval_run_missing(tmp, good):
    return ["rm-eval", str(tmp / "runs" / "missing"), f"output_dir={tmp / 'out'}", *good.data]


def eval_hub_id(tmp, good):
    return ["eval", "HuggingFaceTB/SmolLM2-135M-Instruct", f"output_dir={tmp / 'out'}", *good.data]


def rm_eval_hub_id(tmp, good):
    return ["rm-eval", "HuggingFaceTB/SmolLM2-135M-Instruct", f"output_dir={tmp / 'out'}", *good.data]


def eval_reward_model_missing(tmp, good):
    return ["eval", str(good.model), f"eval.reward_model={tmp / 'rm'}", f"output_dir={tmp / 'out'}", *good.data]


@dataclass
class Case:
    make: Callable[[Path, Good], list[str]]
    message: str  # a regular expression the one-line error must match


CASES = [
    Case(config_not_utf8, r"c\.yaml: not UTF-8 text .*save the config as UTF-8"),
    Case(learning_rate_inf, r"'train\.learning_rate' input should be a finite number"),
    Case(betas_out_of_range, r"'train\.adam_betas\.1' input should be less than 1"),
    Case(key_given_twice, r"train\.learning_rate is given twice; give it once"),
    Case(other_stages_key, r"unknown key 'tdpo' .*it is a key of tdpo \(m1-align tdpo \.\.\.\)"),
    Case(model_folder_empty, r"model path .*empty holds no Hugging Face model"),
    Case(model_hub_id, r"model path HuggingFaceTB/SmolLM2-135M-Instruct is no folder here and looks like a Hugging Face "
                       r"Hub id; .*no internet.*`hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir "
                       r"models/smollm2-135m-instruct`.*set model\.path=models/smollm2-135m-instruct"),
    Case(model_config_not_json, r"config\.json is not valid UTF-8 JSON"),
    Case(unknown_model_type, r"model_type 'llama9000' is not one transformers .* knows"),
    Case(truncated_weights, r"model\.safetensors is damaged or truncated \(.*\); copy the model folder again from where it "
                            r"came from \(compare the file's size with the original's\)$"),
    Case(truncated_stage_weights, r"sft/model/model\.safetensors is damaged or truncated \(.*\); run the stage that wrote "
                                  r"\S+/sft again with overwrite=true"),
    Case(tokenizer_missing, r"no tokenizer in .*model .*set model\.tokenizer"),
    Case(tokenizer_folder_empty, r"no tokenizer in .*tok "),
    Case(output_is_a_file, r"output_dir .*out is a file, not a folder"),
    Case(output_under_a_file, r"output_dir .*afile/run cannot be written"),
    Case(data_not_utf8, r"d\.jsonl: not UTF-8 text .*save the file as UTF-8"),
    Case(pairs_all_degenerate, r"p\.jsonl: every row is degenerate \(1 with chosen == rejected, 1 with an empty response\), nothing "
                               r"to train on; give each pair a non-empty chosen and rejected that differ$"),
    Case(pairs_for_on_policy, r"^error: data\.train_file: p\.jsonl line 1: missing key answer; expected .*keys prompt, "
                              r"answer \(tdpo\.pairs=on_policy samples .* set tdpo\.pairs=built\)$"),
    Case(split_differs, rf"^error: data\.max_per_task={SMALL_DATA['max_per_task']}, data\.eval_per_task="
                        rf"{SMALL_DATA['eval_per_task']}, but the model in .*model \(m1_align_config\.yaml\) was trained on "
                        r"the data built with max_per_task 1500, eval_per_task 100: .*set data\.max_per_task=1500 "
                        r"data\.eval_per_task=100 \(the shipped configs share configs/data\.yaml\)$"),
    Case(unknown_rule, r"r\.jsonl line 1: unknown rule 'icd10' \(known: mcq_letter, icd10_code"),
    Case(deepspeed_config_missing, r"train\.deepspeed: .*zero9\.json not found"),
    Case(eval_run_missing, r"^error: model path \S*runs/missing does not exist; pass a model folder, a finished stage's "
                           r"output dir \(runs/NAME/sft\) or a pipeline run dir \(runs/NAME\)$"),
    Case(rm_eval_run_missing, r"^error: reward model path \S*runs/missing does not exist; pass a reward model folder "
                              r"or a finished rm stage's output dir \(runs/NAME/rm\)$"),
    Case(eval_hub_id, r"^error: model path HuggingFaceTB/SmolLM2-135M-Instruct is no folder here and looks like a "
                      r"Hugging Face Hub id; .*`hf download"),
    Case(rm_eval_hub_id, r"^error: model path HuggingFaceTB/SmolLM2-135M-Instruct is no folder here and looks like "
                         r"a Hugging Face Hub id; .*`hf download"),
    Case(eval_reward_model_missing, r"^error: eval\.reward_model: model path \S*/rm "),
]


@pytest.mark.parametrize("case", CASES, ids=[c.make.__name__ for c in CASES])
def test_bad_input_is_one_line_before_anything_is_written(case, good, tmp_path, capsys):
    argv = case.make(tmp_path, good)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert __import__("re").search(case.message, err), err
    out = tmp_path / "out"
    assert not out.is_dir() or not any(out.iterdir()), "the run wrote into its output folder before failing"


# --- faults and what they must not lose ----------------------------------------------------------------


def test_overwrite_with_a_bad_input_leaves_the_finished_run_in_place(good, tmp_path, capsys):
    from m1_align.runs import StageResult

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    write(out / "model" / "model.safetensors", b"weights")
    StageResult("sft", str(out), {"train_loss": 1.0}).save()
    assert main(sft(tmp_path, good, "overwrite=true", f"data.train_file={tmp_path / 'typo.jsonl'}")) == 2
    assert "typo.jsonl: no such file" in capsys.readouterr().err
    assert (out / "result.json").is_file() and (out / "model" / "model.safetensors").read_bytes() == b"weights"
    assert not (tmp_path / "out.previous").exists()


def test_degenerate_rows_are_dropped_with_a_count(tmp_path, capsys):
    from m1_align.data.user_data import load_user_data

    pairs = [{"prompt": "q1", "chosen": "yes", "rejected": "no"}, {"prompt": "q2", "chosen": "same", "rejected": "same"},
             {"prompt": "q3", "chosen": "", "rejected": "no"}]
    assert load_user_data(jsonl(tmp_path / "p.jsonl", pairs), "preference")["prompt"] == [[{"role": "user", "content": "q1"}]]
    assert "p.jsonl: dropped 2 of 3 rows (1 with chosen == rejected, 1 with an empty response)" in capsys.readouterr().err
    prompts = [{"prompt": "q1", "answer": "I10"}, {"prompt": "q2", "answer": "  "}]
    assert len(load_user_data(jsonl(tmp_path / "r.jsonl", prompts), "rl")) == 1
    assert "r.jsonl: dropped 1 of 2 rows (1 with an empty answer)" in capsys.readouterr().err


@pytest.mark.parametrize("kind, row, fix", [
    ("rl", {"prompt": "ICD-10 code for essential hypertension?", "answer": " "}, "give each question a non-empty answer"),
    ("sft", {"prompt": "What does CKD stand for?", "completion": ""}, "give each conversation an assistant reply with text"),
])
def test_a_file_of_degenerate_rows_says_what_a_usable_row_holds(kind, row, fix, tmp_path):
    from m1_align.data.user_data import DataError, load_user_data

    with pytest.raises(DataError, match=rf"^d\.jsonl: every row is degenerate \(2 with an empty \w+( \w+)?\), nothing to train on; {fix}$"):
        load_user_data(jsonl(tmp_path / "d.jsonl", [row, row]), kind)


def test_a_trainer_checkpoint_counts_only_when_complete(tmp_path, capsys):
    from m1_align.runs import IncompleteCheckpointError, mark_complete
    from m1_align.training import last_checkpoint

    def checkpoint(step: int, marked: bool = True) -> Path:
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"):
            write(folder / name, name * 10)
        if marked:
            mark_complete(folder)
        return folder

    first = checkpoint(2)
    cut_short = checkpoint(4, marked=False)  # killed while saving: no marker
    assert last_checkpoint(tmp_path) == str(first) and not cut_short.exists()
    assert "was cut short while saving; removed" in capsys.readouterr().out
    (first / "optimizer.pt").unlink()  # lost later: must not resume with a fresh optimizer
    with pytest.raises(IncompleteCheckpointError, match="checkpoint-2 is missing optimizer.pt; restore it"):
        last_checkpoint(tmp_path)
    write(first / "optimizer.pt", "short")
    with pytest.raises(IncompleteCheckpointError, match="optimizer.pt is 5 bytes, 120 when written"):
        last_checkpoint(tmp_path)


def test_an_online_checkpoint_without_its_optimizer_state_is_refused(tmp_path):
    import torch

    from m1_align.rl.checkpoint import CHECKPOINT_DIR, load_loop_state, save_loop_state
    from m1_align.runs import IncompleteCheckpointError

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_loop_state(tmp_path, 3, {}, {"policy": optimizer}, {"schedulers": {}})
    assert load_loop_state(tmp_path)["step"] == 3
    (tmp_path / CHECKPOINT_DIR / "optimizers.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="is missing optimizers.pt"):
        load_loop_state(tmp_path)


def test_whole_run_train_loss_weighs_the_steps_before_the_resume():
    from m1_align.training import whole_run_train_loss

    # logged every 2 steps; resumed from checkpoint-4; the resumed process averaged steps 5..6 to 1.0
    state = SimpleNamespace(global_step=6, log_history=[{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0},
                                                        {"step": 6, "loss": 1.0}])
    trainer, output = SimpleNamespace(state=state), SimpleNamespace(training_loss=1.0)
    assert whole_run_train_loss(trainer, output, "out/checkpoints/checkpoint-4") == pytest.approx((3 * 2 + 2 * 2 + 1 * 2) / 6)
    assert whole_run_train_loss(trainer, output, None) == 1.0


def test_a_torn_metrics_line_is_dropped_with_a_note(tmp_path, capsys):
    from m1_align.runs import MetricsLogger, read_metrics

    write(tmp_path / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "metrics.jsonl line 3 is incomplete" in capsys.readouterr().out
    MetricsLogger(tmp_path).truncate_after(1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
     "disk full writing /runs/x/model.safetensors: free space (df -h) or set output_dir on another disk, then run the same "
     "command to resume"),
    # a failed write is called a full disk only when the disk is full (test_a_full_disk_is_one_line_and_says_so)
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"), None),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "cannot write /mnt/ro/run (Read-only file system); choose an output_dir you can write to"),
    (RuntimeError("a bug"), None),
])
def test_file_system_faults_become_one_line(error, expected):
    assert _user_message(error) == expected


def test_import_m1_align_registers_the_hybrid_model_lazily(tiny_model_dir):
    """`import m1_align` stays cheap (transformers is not imported), and once the user imports transformers
    the Auto classes load a Baichuan-M1 folder without trust_remote_code; either import order works."""
    # find_spec first: trl, peft and accelerate probe for transformers that way before importing it
    code = ("import importlib.util, sys; import m1_align; assert 'transformers' not in sys.modules; "
            "assert importlib.util.find_spec('transformers') is not None; "
            "from transformers import AutoModelForCausalLM; "
            f"print(type(AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})).__name__)")
    later = ("import transformers, m1_align; from transformers import AutoConfig; "
             f"print(type(AutoConfig.from_pretrained({str(tiny_model_dir)!r})).__name__)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for source, expected in ((code, "BaichuanM1ForCausalLM"), (later, "BaichuanM1Config")):
        out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == expected, out.stderr[-2000:]


def test_a_full_disk_is_one_line_and_says_so(good, tmp_path, capsys):
    """A real full disk: the output folder on a 1 MiB tmpfs, so the first checkpoint cannot be written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); test_file_system_faults_become_one_line covers the message")
    try:
        argv = ["sft", f"output_dir={disk / 'out'}", f"model.path={good.model}", *good.data, "train.max_steps=2",
                "train.save_steps=1", "train.batch_size=2", "train.max_length=128", "train.eval_limit=1"]
        assert main(argv) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: disk full writing {disk / 'out'}"), errors
        assert "MiB free): free space (df -h)" in errors[0] and errors[0].endswith("run the same command to resume")
        assert len(errors[0]) - len(str(disk)) < 140  # under two terminal lines beside the path, not four
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # lazy: the failed run may still hold a file open


def test_a_model_trained_on_the_same_build_is_continued(good, tmp_path):
    from m1_align.config import SCHEMAS, validate
    from m1_align.training import check_inputs

    model = good.model_copy(tmp_path)
    settings = "\n".join(f"  {k}: {v}" for k, v in SMALL_DATA.items())
    write(model / "m1_align_config.yaml", f"data:\n{settings}\n  cache_dir: elsewhere\n  tasks: [elixhauser]\n")
    overrides = {"model": {"path": str(model)}, "data": dict(SMALL_DATA)}
    check_inputs(validate(SCHEMAS["sft"], overrides, "test"))  # where the cache lives and the tasks are not the build
    check_inputs(validate(SCHEMAS["sft"], {**overrides, "data": {"builtin": False}}, "test"))  # no built data here


def test_a_hub_id_is_told_from_a_mistyped_local_path(tmp_path, monkeypatch):
    from m1_align.training import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and looks_like_hub_id("org/model.v2")
    assert not looks_like_hub_id("runs/sfy")  # under a folder that is here: a typo, told as "no Hugging Face model"
    for local in ("./org/model", "/org/model", "org/model/sub", "model"):
        assert not looks_like_hub_id(local), local


def _without_chat_template(folder: Path) -> Path:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    write(folder / "tokenizer_config.json", json.dumps(config))
    return folder


def test_a_model_without_a_chat_template_is_told_which_template_it_gets(good, tiny_model_dir, tmp_path, capsys):
    from m1_align.config import ModelConfig
    from m1_align.training import load_tokenizer

    llama = _without_chat_template(good.model_copy(tmp_path))
    assert load_tokenizer(ModelConfig(), llama).chat_template is None
    err = capsys.readouterr().err
    assert f"warning: the tokenizer in {llama} has no chat template, so conversations use Baichuan-M1's" in err
    assert f"save its template as {llama}/chat_template.jinja" in err
    load_tokenizer(ModelConfig(), llama)
    assert capsys.readouterr().err == ""  # once per folder
    assert load_tokenizer(ModelConfig(), good.model).chat_template  # its own template: nothing to say
    hybrid = _without_chat_template(Path(shutil.copytree(tiny_model_dir, tmp_path / "hybrid")))
    load_tokenizer(ModelConfig(), hybrid)  # Baichuan-M1's template is the hybrid's own
    assert capsys.readouterr().err == ""


def test_one_deepspeed_config_train_deepspeed_wins_over_the_accelerate_configs_file(good, tmp_path, monkeypatch, capsys):
    """`accelerate launch --config_file configs/accelerate/...` passes its deepspeed_config_file on in the environment;
    train.deepspeed, when set, is the one used by every stage (the online loop too), with a warning naming both."""
    from m1_align.config import SCHEMAS, ConfigError, validate
    from m1_align.rl.loop import OnlineLoop
    from m1_align.training import check_inputs, deepspeed_file

    def config(stage="grpo", **train):
        return validate(SCHEMAS[stage], {"model": {"path": str(good.model)}, "data": dict(SMALL_DATA), "train": train}, "test")

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero3.json")
    zero2 = config(deepspeed="configs/deepspeed/zero2.json")
    check_inputs(zero2)
    assert deepspeed_file(zero2.train) == "configs/deepspeed/zero2.json"
    assert capsys.readouterr().err.strip() == (
        "warning: DeepSpeed config configs/deepspeed/zero2.json (train.deepspeed) is used, not configs/deepspeed/zero3.json "
        "(the accelerate config's deepspeed_config_file); name one file in one place")
    loop = SimpleNamespace(cfg=zero2, world_size=2)
    assert OnlineLoop._deepspeed_config(loop)["zero_optimization"]["stage"] == 2  # the online loop follows the rule

    check_inputs(config(deepspeed=str(Path("configs/deepspeed/zero3.json").resolve())))  # the same file: nothing to say
    launched = config("sft")
    check_inputs(launched)
    assert capsys.readouterr().err == "" and deepspeed_file(launched.train) == "configs/deepspeed/zero3.json"
    assert OnlineLoop._deepspeed_config(SimpleNamespace(cfg=config(), world_size=2))["zero_optimization"]["stage"] == 3

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "zero9.json"))
    with pytest.raises(ConfigError, match=r"^the accelerate config's deepspeed_config_file: .*zero9\.json not found"):
        check_inputs(launched)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_inputs(launched)  # not launched with DeepSpeed: the variable is not read
    assert deepspeed_file(launched.train) is None
