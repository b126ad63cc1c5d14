"""`m1-align upcycle` on a tiny random Llama: exact where m1_align/model/upcycle.py says it is, and not
beyond the window; the folder round-trips through save/load (and vLLM); bad sources and options get one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from m1_align.cli import main
from m1_align.model.modeling import NormHead
from m1_align.model.upcycle import UpcycleError, parse_options, upcycle
from m1_align.runs import OutputExistsError

LENGTH = 40


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    """3 layers, 4 query heads on 2 KV heads of 32, a non-default RoPE theta and random norm weights (Llama
    initialises them to ones, which would hide a norm copied to the wrong place)."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("llama3")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def source(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


def converted(llama_dir, out, *options):
    from transformers import AutoModelForCausalLM

    report = upcycle(llama_dir, out, parse_options(list(options)))
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval(), report


def ids(length=LENGTH, batch=2, seed=0):
    return torch.randint(5, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_plain_head_and_a_window_over_the_length_give_the_source_model(llama_dir, source, tmp_path):
    hybrid, report = converted(llama_dir, tmp_path / "h", "head=plain", f"window={LENGTH}")
    assert type(hybrid).__name__ == "BaichuanM1ForCausalLM" and type(hybrid.lm_head) is torch.nn.Linear
    x = ids()
    diff = (hybrid(input_ids=x).logits - source(input_ids=x).logits).abs().max()
    assert diff < 1e-5, diff
    assert report["hidden_max_rel_diff_within_window"] < 1e-5 and report["kl_to_source_mean_within_window"] < 1e-8

    # cached decode from a left-padded batch: the same greedy tokens and the same logits at every step
    prompt = ids(length=12, seed=1)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=LENGTH - 12, do_sample=False, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    ref, out = source.generate(prompt, **kwargs), hybrid.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    step_diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True))
    assert step_diff < 1e-5, step_diff


@torch.no_grad()
def test_a_short_window_changes_the_logits_from_the_window_on_only(llama_dir, source, tmp_path):
    window = 8
    hybrid, _ = converted(llama_dir, tmp_path / "h", "head=plain", f"window={window}")
    assert hybrid.config.sliding_window_layers == [1]  # 'odd' of 3 layers
    x = ids()
    diff = (hybrid(input_ids=x).logits - source(input_ids=x).logits).abs().amax(dim=(0, 2))  # per position
    assert diff[:window].max() < 1e-5, diff
    assert (diff[window:] > 1e-3).all(), diff
    # the cached decode of the hybrid itself agrees with its full forward past the window
    full = hybrid(input_ids=x).logits
    gen = hybrid.generate(x[:, :4], max_new_tokens=LENGTH - 4, do_sample=False, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
    full = hybrid(input_ids=gen.sequences).logits[:, 3:-1]
    assert (torch.stack(gen.logits, 1) - full).abs().max() < 1e-4


def test_the_folder_holds_the_layout_the_identity_conv_and_the_source_tokenizer(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "h"
    _, report = converted(llama_dir, out, "window=16", "sliding_layers=0,2")
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((llama_dir / "config.json").read_text())
    assert config["model_type"] == "baichuan_m1" and config["architectures"] == ["BaichuanM1ForCausalLM"]
    assert config["sliding_window"] == 16 and config["sliding_window_layers"] == [0, 2]
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps"):
        assert config[key] == source_config[key], key
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["num_swa_attention_heads"], config["num_swa_key_value_heads"]) == (4, 2)
    assert config["rope_theta"] == 5000.0 and config["norm_head"] is True and config["tie_word_embeddings"] is False

    weights, source_weights = load_file(out / "model.safetensors"), load_file(llama_dir / "model.safetensors")
    for i in range(3):
        conv_k, conv_v = weights[f"model.layers.{i}.self_attn.conv_k"], weights[f"model.layers.{i}.self_attn.conv_v"]
        assert conv_k.shape == (1, 1, 2, 1, 2)
        assert torch.equal(conv_k.flatten(), torch.tensor([0.0, 1.0] * 2)) and torch.equal(conv_v, conv_k)
        attn = f"model.layers.{i}.self_attn."
        stacked = torch.cat([source_weights[attn + p] for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")])
        assert torch.equal(weights[attn + "W_pack.weight"], stacked)
    embed = source_weights["model.embed_tokens.weight"]
    assert torch.equal(weights["lm_head.weight"], embed)  # the tied head, now its own copy
    # NormHead: the final norm carries the mean row norm, so the typical logit keeps its scale
    rescale = float(embed.norm(dim=-1).mean())
    assert report["norm_head_rescale"] == pytest.approx(rescale)
    assert torch.allclose(weights["model.norm.weight"], source_weights["model.norm.weight"] * rescale)

    source_tok, tok = AutoTokenizer.from_pretrained(str(llama_dir)), AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == source_tok.chat_template and tok.get_vocab() == source_tok.get_vocab()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == source_tok.eos_token_id
    assert json.loads((out / "upcycle.json").read_text())["options"]["sliding_layers"] == "0,2"


@torch.no_grad()
def test_norm_head_logits_are_the_source_hidden_states_on_normalised_rows(llama_dir, source, tmp_path):
    hybrid, report = converted(llama_dir, tmp_path / "h")  # the defaults: NormHead, window 128 > LENGTH
    assert isinstance(hybrid.lm_head, NormHead)
    x = ids()
    hidden = source.model(input_ids=x).last_hidden_state
    rows = source.lm_head.weight
    # the pad row is zeros: F.normalize keeps it zero (its eps), so do the same here
    expected = hidden @ (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T * rows.norm(dim=-1).mean()
    assert (hybrid(input_ids=x).logits - expected).abs().max() < 1e-4
    assert report["kl_to_source_mean"] > 1e-4  # not function-preserving, and the report says by how much


def test_refusals_are_one_line_and_write_nothing(llama_dir, tmp_path, capsys):
    from transformers import Qwen2Config

    qwen = tmp_path / "qwen"
    Qwen2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2).save_pretrained(qwen)
    with pytest.raises(UpcycleError, match="model_type 'qwen2' is not a Llama"):
        upcycle(qwen, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for bad, message in (("window=0", "window=0: Input should be greater than or equal to 1"),
                         ("size=3", "'size=3' is not key=value with a key among window"),
                         ("head=tied", "head=tied"),
                         ("sliding_layers=1,7", r"layers \[7\] are out of range for the source's 3 layers")):
        with pytest.raises(UpcycleError, match=message):
            upcycle(llama_dir, tmp_path / "out", parse_options([bad]))

    out = tmp_path / "done"
    upcycle(llama_dir, out, parse_options(["window=4"]))
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        upcycle(llama_dir, out, parse_options(["window=8"]))
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    assert main(["upcycle", str(llama_dir), str(out), "window=8"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["upcycle", str(qwen), str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "qwen2" in err and "\n" not in err

    assert main(["upcycle", str(llama_dir), str(out), "window=8", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_vllm_serves_the_upcycled_model_as_the_source(llama_dir, source, tmp_path):
    """The plain head through the plugin: vLLM must not L2-normalise it (config.norm_head false)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from m1_align.rollout.engine import SamplingSettings
    from m1_align.rollout.vllm_engine import VLLMEngine
    from m1_align.rollout.weights import model_logprobs

    window = 16
    upcycle(llama_dir, tmp_path / "h", parse_options(["head=plain", f"window={window}"]))
    hybrid = AutoModelForCausalLM.from_pretrained(str(tmp_path / "h"), dtype=torch.float32).eval()
    engine = VLLMEngine(tmp_path / "h", dtype="float32", enforce_eager=True, kv_cache_gib=1, max_model_len=256)
    try:
        prompts = [ids(length=n, batch=1, seed=n)[0].tolist() for n in (3, 30)]  # 3 + 12 tokens fit the window
        out = engine.generate(prompts, SamplingSettings(n=1, max_new_tokens=12, stop_token_ids=(), seed=0))
    finally:
        engine.close()
    for prompt, (completion,) in zip(prompts, out, strict=True):
        sequence = prompt + completion.token_ids
        reference = model_logprobs(hybrid, sequence)[len(prompt) - 1:]
        assert (torch.tensor(completion.logprobs) - reference).abs().max() < 2e-4
        if len(sequence) <= window:  # within the window the hybrid is the source
            assert (model_logprobs(source, sequence)[len(prompt) - 1:] - reference).abs().max() < 1e-5
