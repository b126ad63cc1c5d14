"""The Baichuan-M1 hybrid model: cache, padding, packing, window/conv reach, checkpoint format, training paths.

fp32, tiny configs (tiny preset: window W=8, head_dim 64 in global layers and 32 in sliding ones)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from m1_align.model import (
    BaichuanM1Cache,
    BaichuanM1Config,
    BaichuanM1ForCausalLM,
    BaichuanM1ForSequenceClassification,
    BaichuanM1Model,
    preset_config,
    register,
)
from m1_align.model.modeling import window_chunked_attention

W = 8  # the tiny preset's window
VOCAB = 512


def tiny_model(cls=BaichuanM1ForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(preset_config("tiny", **overrides)).eval()


def random_ids(*shape, seed=1):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(samples, pad_id=0):
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, mask


# --- generation cache --------------------------------------------------------------------------------


@torch.no_grad()
def test_cached_decode_matches_full_forward():
    model = tiny_model()
    ids = random_ids(2, 3 * W + 5)  # longer than 2W: the sliding cache has to trim
    full = model(ids).logits

    out = model(ids[:, :5], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    assert isinstance(cache, BaichuanM1Cache)
    out = model(ids[:, 5:11], past_key_values=cache, use_cache=True)  # a multi-token chunk after a prefix
    steps.append(out.logits)
    for t in range(11, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)

    kept = [layer.keys.shape[2] for layer in cache.layers]
    sliding = model.config.sliding_window_layers
    assert all(n == W - 1 if i in sliding else n == ids.shape[1] for i, n in enumerate(kept)), kept
    assert all(
        k.shape[:3] == (2, cache.layers[i].keys.shape[1], 1) for i, (k, _) in enumerate(cache.conv_states)
    )


@torch.no_grad()
def test_left_padded_batch_decode_matches_each_sample_alone():
    model = tiny_model()
    samples = [random_ids(n, seed=n) for n in (3 * W, 2 * W + 3, W + 1)]
    ids, mask = left_pad(samples)
    prefix = 6  # the shortest sample starts after column 6 -> the prefill is pure padding for it
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    batched = torch.cat(steps, 1)
    for row, sample in enumerate(samples):
        alone = model(sample[None]).logits[0]
        torch.testing.assert_close(batched[row, -len(sample) :], alone, atol=1e-4, rtol=0)


@torch.no_grad()
def test_generate_greedy_cache_equals_no_cache_and_argmax_loop():
    model = tiny_model()
    samples = [random_ids(n, seed=10 + n) for n in (2 * W + 4, W - 3, W + 2)]
    ids, mask = left_pad(samples)
    kwargs = dict(max_new_tokens=2 * W, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert isinstance(cached.past_key_values, BaichuanM1Cache)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached)
    for row, sample in enumerate(samples):
        seq = sample.tolist()
        for _ in range(2 * W):  # full forward + argmax, no cache, no padding
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert cached.sequences[row, ids.shape[1] :].tolist() == seq[len(sample) :]


# --- packing -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_packed_rows_match_samples_run_alone():
    model = tiny_model()
    rows = [
        [random_ids(n, seed=n) for n in (13, 2 * W + 4, 5)],
        [random_ids(n, seed=100 + n) for n in (16, 22)],
    ]
    ids = torch.stack([torch.cat(r) for r in rows])
    position_ids = torch.stack([torch.cat([torch.arange(len(s)) for s in r]) for r in rows])
    packed = model(ids, position_ids=position_ids).logits
    for row, samples in enumerate(rows):
        start = 0
        for sample in samples:
            alone = model(sample[None]).logits[0]
            torch.testing.assert_close(packed[row, start : start + len(sample)], alone, atol=1e-4, rtol=0)
            start += len(sample)


# --- reach of the window and the conv ----------------------------------------------------------------


def one_layer(sliding: bool, zero_previous_tap=False) -> BaichuanM1Model:
    model = tiny_model(BaichuanM1Model, num_hidden_layers=1, sliding_window_layers=[0] if sliding else [])
    if zero_previous_tap:
        with torch.no_grad():
            for taps in (model.layers[0].self_attn.conv_k, model.layers[0].self_attn.conv_v):
                taps[..., 0] = 0.0
    return model


@torch.no_grad()
def output_changes(model, t, perturbed, position_ids=None, length=3 * W):
    ids = random_ids(1, length, seed=5)
    other = ids.clone()
    other[0, perturbed] = (other[0, perturbed] + 1) % VOCAB
    a = model(ids, position_ids=position_ids).last_hidden_state[0, t]
    b = model(other, position_ids=position_ids).last_hidden_state[0, t]
    return not torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [W - 1, 2 * W + 3])  # one window-sized block, and the chunked kernel (T > W)
def test_window_reach_without_conv(t):
    full, sliding = one_layer(False, zero_previous_tap=True), one_layer(True, zero_previous_tap=True)
    assert output_changes(full, t, t - 1) and output_changes(sliding, t, t - 1)
    assert output_changes(sliding, t, t - W + 1)  # the oldest key in the window
    if t - W >= 0:
        assert output_changes(full, t, t - W)
        assert not output_changes(sliding, t, t - W)


def test_conv_extends_the_sliding_reach_by_one_token():
    # key t-W+1 is mixed with raw key t-W by the conv, so a sliding layer sees exactly one token further
    full, sliding = one_layer(False), one_layer(True)
    t = 2 * W + 3
    assert output_changes(full, t, t - 1) and output_changes(sliding, t, t - 1)
    assert output_changes(full, t, t - W) and output_changes(sliding, t, t - W)
    assert output_changes(full, t, t - W - 1) and not output_changes(sliding, t, t - W - 1)


@pytest.mark.parametrize("sliding", [False, True])
def test_conv_restarts_at_sample_boundaries(sliding):
    model = one_layer(sliding)
    boundary = 10  # sample B starts here
    packed = torch.cat([torch.arange(boundary), torch.arange(2 * W)])[None]
    # attention alone cannot carry token boundary-1 into sample B; only the conv could
    assert not output_changes(model, boundary, boundary - 1, position_ids=packed, length=boundary + 2 * W)
    # the same tokens as one sample: now the conv does carry token boundary-1 over
    assert output_changes(model, boundary, boundary - 1, length=boundary + 2 * W)


# --- the window-chunked kernel -----------------------------------------------------------------------


@pytest.mark.parametrize("length", [W + 1, 5 * W, 5 * W + 3])
def test_window_chunked_attention_equals_masked_attention(length):
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 16, requires_grad=True)
    k = torch.randn(2, 2, length, 16, requires_grad=True)
    v = torch.randn(2, 2, length, 16, requires_grad=True)
    i = torch.arange(length)
    mask = (i[None] <= i[:, None]) & (i[:, None] - i[None] < W)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    chunked = window_chunked_attention(q, k, v, W)
    torch.testing.assert_close(chunked, masked, atol=1e-5, rtol=0)
    g_masked = torch.autograd.grad(masked.square().sum(), (q, k, v))
    g_chunked = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    for a, b in zip(g_chunked, g_masked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_generation_sees_compile_forced_off():
    """Under eager_generation every torch.compile runs eagerly, FlexAttention's too (an eager FlexAttention
    materialises the scores), so the sliding layers must see it and take the chunked path: this reads a private
    torch attribute, and fails if a torch release moves it."""
    from m1_align.model.modeling import compile_is_forced_off
    from m1_align.training import eager_generation

    assert not compile_is_forced_off()
    with eager_generation():
        assert compile_is_forced_off()
    assert not compile_is_forced_off()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention is the CUDA path; on CPU its backward is unsupported")
def test_flex_sliding_attention_equals_masked_attention_on_cuda():
    from m1_align.model.modeling import flex_sliding_attention

    torch.manual_seed(0)
    length, window = 512, 128
    q = torch.randn(2, 8, length, 64, device="cuda", requires_grad=True)
    k = torch.randn(2, 2, length, 64, device="cuda", requires_grad=True)
    v = torch.randn(2, 2, length, 64, device="cuda", requires_grad=True)
    i = torch.arange(length, device="cuda")
    mask = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    flex = flex_sliding_attention(q, k, v, window)
    torch.testing.assert_close(flex, masked, atol=2e-3, rtol=0)
    for a, b in zip(torch.autograd.grad(flex.square().sum(), (q, k, v)), torch.autograd.grad(masked.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-3)


@torch.no_grad()
def test_model_chunked_path_equals_masked_path():
    # a right-padded row takes the masked path; its real part must equal the unpadded fast path
    model = tiny_model()
    ids = random_ids(1, 4 * W + 3)
    fast = model(ids).logits
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=torch.long)], 1)
    masked = model(padded, attention_mask=mask).logits[:, : ids.shape[1]]
    torch.testing.assert_close(masked, fast, atol=1e-5, rtol=0)


# --- the released checkpoint's format -----------------------------------------------------------------


def reference_logits(weights: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Plain loops over tokens and heads, written from the paper / official code description."""
    T, C = len(ids), cfg["hidden_size"]

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])

    x = weights["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sliding = layer in cfg["sliding_window_layers"]
        H = cfg["num_swa_attention_heads"] if sliding else cfg["num_attention_heads"]
        Hkv = cfg["num_swa_key_value_heads"] if sliding else cfg["num_key_value_heads"]
        D = C // H
        h = rms(x, weights[p + "input_layernorm.weight"])
        qkv = h @ weights[p + "self_attn.W_pack.weight"].T
        q = qkv[:, :C].reshape(T, H, D)
        k = qkv[:, C : C + Hkv * D].reshape(T, Hkv, D)
        v = qkv[:, C + Hkv * D :].reshape(T, Hkv, D)
        ck = weights[p + "self_attn.conv_k"].reshape(Hkv, 2)
        cv = weights[p + "self_attn.conv_v"].reshape(Hkv, 2)
        k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
        for t in range(T):
            for g in range(Hkv):
                k2[t, g] = ck[g, 1] * k[t, g] + (ck[g, 0] * k[t - 1, g] if t > 0 else 0)
                v2[t, g] = cv[g, 1] * v[t, g] + (cv[g, 0] * v[t - 1, g] if t > 0 else 0)

        def rope(vec, t, D=D):
            inv = cfg["rope_theta"] ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
            cos, sin = torch.cos(t * inv), torch.sin(t * inv)
            a, b = vec[: D // 2], vec[D // 2 :]
            return torch.cat([a * cos - b * sin, b * cos + a * sin])

        out = torch.zeros(T, H, D)
        for t in range(T):
            first = max(0, t - cfg["sliding_window"] + 1) if sliding else 0
            for head in range(H):
                g = head // (H // Hkv)
                qt = rope(q[t, head], t)
                keys = torch.stack([rope(k2[j, g], j) for j in range(first, t + 1)])
                probs = torch.softmax(keys @ qt / math.sqrt(D), 0)
                out[t, head] = probs @ v2[first : t + 1, g]
        x = x + out.reshape(T, C) @ weights[p + "self_attn.o_proj.weight"].T
        h = rms(x, weights[p + "post_attention_layernorm.weight"])
        gate, up = h @ weights[p + "mlp.gate_proj.weight"].T, h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms(x, weights["model.norm.weight"])
    head = weights["lm_head.weight"]
    return x @ (head / head.norm(dim=-1, keepdim=True)).T


def test_official_checkpoint_format_loads_and_matches_reference(tmp_path):
    cfg = {  # the released config.json's keys, scaled down
        "architectures": ["BaichuanM1ForCausalLM"],
        "model_type": "baichuan_m1",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_swa_attention_heads": 4,
        "num_swa_key_value_heads": 2,
        "sliding_window": 4,
        "sliding_window_layers": [1],
        "conv_window": 2,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }
    gen = torch.Generator().manual_seed(3)
    C, inter = cfg["hidden_size"], cfg["intermediate_size"]
    weights = {
        "model.embed_tokens.weight": torch.randn(cfg["vocab_size"], C, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(C, generator=gen),
        "lm_head.weight": torch.randn(cfg["vocab_size"], C, generator=gen),
    }
    for layer in range(cfg["num_hidden_layers"]):
        sliding = layer in cfg["sliding_window_layers"]
        H = cfg["num_swa_attention_heads"] if sliding else cfg["num_attention_heads"]
        Hkv = cfg["num_swa_key_value_heads"] if sliding else cfg["num_key_value_heads"]
        kv = Hkv * C // H
        p = f"model.layers.{layer}."
        weights |= {
            p + "self_attn.W_pack.weight": 0.2 * torch.randn(C + 2 * kv, C, generator=gen),
            p + "self_attn.o_proj.weight": 0.1 * torch.randn(C, C, generator=gen),
            p + "self_attn.conv_k": torch.rand(1, 1, Hkv, 1, 2, generator=gen),
            p + "self_attn.conv_v": torch.rand(1, 1, Hkv, 1, 2, generator=gen),
            p + "mlp.gate_proj.weight": 0.1 * torch.randn(inter, C, generator=gen),
            p + "mlp.up_proj.weight": 0.1 * torch.randn(inter, C, generator=gen),
            p + "mlp.down_proj.weight": 0.1 * torch.randn(C, inter, generator=gen),
            p + "input_layernorm.weight": 1 + 0.1 * torch.randn(C, generator=gen),
            p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(C, generator=gen),
        }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, BaichuanM1ForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert model.config.interleaved_sliding_window == 4
    ids = random_ids(11, seed=4).remainder(cfg["vocab_size"]).tolist()
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, reference_logits(weights, cfg, ids), atol=1e-4, rtol=1e-4)


def test_14b_preset_has_the_released_shapes():
    config = preset_config("baichuan-m1-14b")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in BaichuanM1ForCausalLM(config).state_dict().items()}
    assert shapes["model.layers.0.self_attn.W_pack.weight"] == (6144, 5120)  # 20 heads x 256, 2 KV heads
    assert shapes["model.layers.1.self_attn.W_pack.weight"] == (7168, 5120)  # 40 heads x 128, 8 KV heads
    assert shapes["model.layers.0.self_attn.conv_k"] == (1, 1, 2, 1, 2)
    assert shapes["model.layers.1.self_attn.conv_v"] == (1, 1, 8, 1, 2)
    assert shapes["lm_head.weight"] == (133120, 5120) and len(config.sliding_window_layers) == 20
    assert config.layer_types[:2] == ["full_attention", "sliding_attention"]


# --- save / load, sequence classification ------------------------------------------------------------


@torch.no_grad()
def test_causal_lm_save_load_round_trip_through_auto_classes(tmp_path):
    register()  # idempotent
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "baichuan_m1"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BaichuanM1Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 12)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@torch.no_grad()
def test_sequence_classification_scalar_head_and_round_trip(tmp_path):
    model = tiny_model(BaichuanM1ForSequenceClassification, pad_token_id=0)
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 128)
    samples = [random_ids(n, seed=n) for n in (12, 7)]
    ids, mask = left_pad(samples)
    scores = model(ids, attention_mask=mask).logits
    assert scores.shape == (2, 1)
    for row, sample in enumerate(samples):
        torch.testing.assert_close(scores[row], model(sample[None]).logits[0], atol=1e-5, rtol=0)
    right = torch.zeros_like(ids)  # right padding pools the same token, found from pad_token_id alone
    for row, sample in enumerate(samples):
        right[row, : len(sample)] = sample
    torch.testing.assert_close(model(right).logits, scores, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BaichuanM1ForSequenceClassification)
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, scores, atol=0, rtol=0)


# --- training paths ----------------------------------------------------------------------------------


def test_lora_trains():
    peft = pytest.importorskip("peft")
    model = tiny_model().train()
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    model = peft.get_peft_model(model, lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("W_pack.lora_A" in n for n in trainable)
    ids = random_ids(4, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_grads():
    model = tiny_model().train()
    ids = random_ids(2, 3 * W + 1)
    plain = grads(model, ids)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads(model, ids)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert plain["model.layers.1.self_attn.conv_k"].abs().sum() > 0  # the conv taps learn


def test_bf16_forward_backward_close_to_fp32():
    model = tiny_model().train()
    ids = random_ids(2, 3 * W)
    loss32 = model(input_ids=ids, labels=ids).loss
    bf16 = tiny_model().train().to(torch.bfloat16)
    out = bf16(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in bf16.parameters())
    assert abs(out.loss.item() - loss32.item()) < 0.05


def test_the_prepared_gpu_check_runs(tmp_path):
    """bench/gpu_check.py waits for a session that is lent a GPU; its --quick CPU run keeps it from rotting."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    out = tmp_path / "gpu_check.md"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    text = out.read_text()
    assert "1. Training step" in text and "2. Forward+backward at varying lengths" in text and "4. HF generate" in text
    assert "3. The step of 1 with the decoder layers compiled" in text and "failed" not in text
    assert "5. Prefill-style forward" in text and "Largest logit difference" in text
    assert "| flex - chunked | 0.00e+00 | 0.00e+00 | 0.00e+00 | 0.00e+00 |" in text  # on a CPU: the same path twice
    assert text.count("window-chunked SDPA") >= 3 and "causal SDPA" in text
