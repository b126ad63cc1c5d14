"""Every stage on a Hugging Face Llama with a ChatML template (no {% generation %} markers), the shape of
SmolLM2-135M-Instruct in a few MB; and one slow test on the real SmolLM2, imported from its GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import stage_overrides

from m1_align.config import SCHEMAS, validate
from m1_align.data.chat import encode_chat

QUICK = {"train.max_steps": 2, "train.batch_size": 4, "train.max_length": 384, "train.save_steps": 100,
         "train.eval_limit": 2, "train.eval_max_new_tokens": 16, "train.logging_steps": 1}
ONLINE = {"rollout.max_new_tokens": 24, "rollout.kv_cache_gib": 0.25, "rollout.engine": "vllm"}


def config(stage, data_cache, out, model_dir, **extra):
    return validate(SCHEMAS[stage], stage_overrides(data_cache, out, model_dir, **{**QUICK, **extra}), "test")


def test_chatml_assistant_mask_covers_the_assistant_turn_and_its_end(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    messages = [{"role": "user", "content": "Code for type 2 diabetes?"},
                {"role": "assistant", "content": "It is in E11.\nAnswer: E11.9"},
                {"role": "user", "content": "And type 1?"}, {"role": "assistant", "content": "Answer: E10.9"}]
    out = encode_chat(tok, messages)
    ids, mask = out["input_ids"], out["assistant_mask"]
    assert len(ids) == len(mask)
    marked = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert marked == "It is in E11.\nAnswer: E11.9<|im_end|>\nAnswer: E10.9<|im_end|>\n"
    assert "user" not in marked and "assistant" not in marked


@pytest.mark.slow
def test_every_stage_runs_on_a_chatml_llama(data_cache, tiny_llama_dir, tmp_path):
    from m1_align.evaluation.run import run as run_eval
    from m1_align.preference.trainer import run as run_tdpo
    from m1_align.reward_models.trainer import run as run_rm
    from m1_align.rl.elo import run as run_elo
    from m1_align.rl.ppo import run_grpo
    from m1_align.sft.trainer import run as run_sft

    sft = run_sft(config("sft", data_cache, tmp_path / "sft", tiny_llama_dir, **{"model.lora.enabled": True,
                                                                               "model.lora.merge_on_save": True}))
    assert sft.metrics["steps"] == 2
    adapter = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    # LoRA targets chosen by architecture: every linear layer of the Llama body, not the head
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    merged = tmp_path / "sft"  # model/ holds the merged weights
    assert (merged / "model" / "model.safetensors").is_file()
    run_tdpo(config("tdpo", data_cache, tmp_path / "tdpo", merged))
    rm = run_rm(config("rm", data_cache, tmp_path / "rm", merged))
    assert 0 <= rm.metrics["accuracy"] <= 1
    elo = run_elo(config("elo", data_cache, tmp_path / "elo", merged, **ONLINE, **{"elo.k": 2, "elo.prompts_per_step": 2,
                                                                                 "elo.drop_degenerate": False, "elo.kl_coef": 0.1}))
    grpo = run_grpo(config("grpo", data_cache, tmp_path / "grpo", tmp_path / "elo", **ONLINE, **{
        "ppo.prompts_per_step": 2, "ppo.samples_per_prompt": 2, "ppo.minibatch_size": 4, "reward.model": str(tmp_path / "rm"),
        # no TIS at temperature 0.7: the engines' log-probs are of the temperature-1 distribution (config refuses it)
        "reward.mode": "mix", "ppo.dynamic_sampling": True, "ppo.max_sampling_rounds": 2,
        "ppo.clip_range_high": 0.28, "ppo.overlong_buffer": 8, "rollout.temperature": 0.7,
        "model.lora.enabled": True, "model.lora.merge_on_save": True,  # LoRA: the reference is the adapter-disabled policy
        "model.compile": True}))  # compiled layers: the weight sync and the saved model keep the parameters' names
    for result in (elo, grpo):
        steps = [json.loads(line) for line in (tmp_path / result.stage / "metrics.jsonl").read_text().splitlines()]
        # the engine samples the Llama's weights after every update
        assert all(r["sync/logprob_diff"] < 2e-3 for r in steps if "sync/logprob_diff" in r)
    grpo_steps = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ratio/first_minibatch_max_dev"] < 1e-3 for r in grpo_steps if "policy_loss" in r)
    run_eval(validate(SCHEMAS["eval"], {"model": {"path": str(tmp_path / "grpo")}, "output_dir": str(tmp_path / "eval"),
                                        "data": stage_overrides(data_cache, tmp_path, None)["data"],
                                        "eval": {"limit": 2, "mmlu_limit": 6, "mmlu_generation_limit": 2, "max_new_tokens": 8}},
                      "test"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["mmlu_medical/n"] == 6 and report["mmlu_medical/n_generation"] == 2


@pytest.mark.slow
def test_real_smollm2_imports_trains_a_lora_step_and_samples_through_vllm(tmp_path):
    from peft import get_peft_model

    from m1_align.config import LoraConfig
    from m1_align.model.gguf_import import import_gguf
    from m1_align.rollout.engine import SamplingSettings
    from m1_align.rollout.factory import make_engine
    from m1_align.training import peft_config

    report = import_gguf("smollm2", tmp_path / "smollm2")
    assert report["architecture"] == "LlamaForCausalLM" and report["vocab_size"] == 49152
    assert report["probe_max_abs_logprob_diff"] < 1e-4  # the saved folder against the GGUF-loaded model
    assert report["eos_token"] == "<|im_end|>" and report["pad_token"] != report["eos_token"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "smollm2"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2"), dtype=torch.float32)
    model = get_peft_model(model, peft_config(LoraConfig(enabled=True, r=8, alpha=16)))
    out = encode_chat(tok, [{"role": "user", "content": "Expand the abbreviation BP."},
                            {"role": "assistant", "content": "Answer: blood pressure"}])
    ids = torch.tensor([out["input_ids"]])
    labels = ids.masked_fill(torch.tensor([out["assistant_mask"]]) == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model(input_ids=ids, labels=labels).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids, labels=labels).loss
    assert after < before  # one LoRA step lowers the loss on its own example

    engine = make_engine("vllm", model_dir=str(tmp_path / "smollm2"), tokenizer=tok, dtype="float32", kv_cache_gib=0.5,
                         enforce_eager=True, max_model_len=512)
    try:
        engine.update_weights(model)  # the LoRA-trained weights, merged on the fly
        assert engine.verify_weights(model, out["input_ids"]) < 2e-3
        (completion,), = engine.generate([out["input_ids"][:-8]], SamplingSettings(n=1, temperature=0.0, max_new_tokens=8))
        assert completion.token_ids
    finally:
        engine.close()


def test_dtype_auto_keeps_fp32_weights_and_autocasts_only_where_bf16_is_faster(monkeypatch, data_cache, tiny_llama_dir, tmp_path):
    from m1_align import training

    assert isinstance(training.bf16_matmul_faster(size=256, seconds=0.05), bool)  # the probe itself runs
    cfg = config("sft", data_cache, tmp_path / "out", tiny_llama_dir, **{"model.dtype": "auto"})
    assert training.resolve_dtype("auto") == torch.float32
    for faster in (True, False):
        monkeypatch.setattr(training, "bf16_matmul_faster", lambda *a, faster=faster, **k: faster)
        expected = torch.bfloat16 if faster or torch.cuda.is_available() else torch.float32
        assert training.compute_dtype("auto") == expected
        assert training.training_arguments(cfg, tmp_path)["bf16"] == (expected == torch.bfloat16)
    assert training.compute_dtype("float32") == torch.float32 and training.compute_dtype("bfloat16") == torch.bfloat16


FREED_KB = """
import sys, torch
from m1_align.training import keep_freed_memory
def rss_kb(): return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
if sys.argv[1] == "keep": assert keep_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB
before = rss_kb()
del x
print(before - rss_kb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory acts only on Linux, through glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_tensor_for_the_next_one():
    """By default glibc unmaps a freed 64 MiB tensor (so the next one page-faults afresh); after
    keep_freed_memory (which the CLI calls) the memory stays with the process for reuse."""
    freed = {mode: int(subprocess.run([sys.executable, "-c", FREED_KB, mode], capture_output=True, text=True,
                                      check=True).stdout) for mode in ("default", "keep")}
    assert freed["default"] > 48 * 1024 and freed["keep"] < 8 * 1024, freed


def test_log_probs_refuse_a_model_whose_forward_rescales_the_logits():
    """Log-probs apply the output layer to the decoder's hidden states themselves; Gemma-2's soft-capping
    (or Cohere's logit_scale) happens after it in forward, so using such a model must stop with a clear error."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from m1_align.logprobs import output_head

    small = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                 num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0)))
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert output_head(llama) is llama.lm_head


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_model_dir"])
def test_compiled_layers_give_the_eager_loss_gradients_and_samples(fixture, request):
    """model.compile: every decoder layer compiled in place, once for all layers and lengths (packed rows
    of two samples at three widths); the parameters keep their names; generation runs eager and samples
    what the uncompiled model samples."""
    from transformers import AutoModelForCausalLM

    from m1_align.config import ModelConfig
    from m1_align.rollout.engine import SamplingSettings
    from m1_align.rollout.hf_engine import HFEngine
    from m1_align.training import load_model

    model_dir = request.getfixturevalue(fixture)
    eager = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    eager.config.use_cache = False  # as compile_layers sets it; a cache also hides packing from transformers' masks
    compiled = load_model(ModelConfig(path=str(model_dir), dtype="float32", compile=True))
    layers = compiled.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers) and len(layers) == compiled.config.num_hidden_layers
    assert [name for name, _ in compiled.named_parameters()] == [name for name, _ in eager.named_parameters()]
    torch.manual_seed(0)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for width in (40, 33, 47):
        ids = torch.randint(3, compiled.config.vocab_size, (2, width))
        positions = torch.cat([torch.arange(width - 15), torch.arange(15)]).expand(2, width)  # two samples a row
        losses, grads = [], []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    # one dynamic graph serves every layer and width (a KV cache built per forward made one per layer)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 2
    sampling = SamplingSettings(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    expected = HFEngine(eager).generate(prompts, sampling)
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = HFEngine(compiled).generate(prompts, sampling)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs  # generation compiles nothing
    assert [[c.token_ids for c in group] for group in got] == [[c.token_ids for c in group] for group in expected]
    # option log-likelihoods continue each prompt's KV cache: eager too, and as the uncompiled model scores them
    from transformers import AutoTokenizer

    from m1_align.evaluation.benchmarks import option_logliks

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [{"prompt": [{"role": "user", "content": "Which organ pumps blood?"}], "options": ["heart", "liver", "lung"]},
            {"prompt": [{"role": "user", "content": "Insulin lowers?"}], "options": ["glucose", "sodium", "urea"]}]
    expected = option_logliks(eager, tok, rows)
    got = option_logliks(compiled, tok, rows)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs
    assert sum(got, []) == pytest.approx(sum(expected, []), abs=1e-5)
