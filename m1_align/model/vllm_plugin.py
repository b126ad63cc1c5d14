"""vLLM plugin: makes `BaichuanM1ForCausalLM` checkpoints loadable by vLLM.

pyproject.toml declares `register` under the `vllm.general_plugins` entry point, and vLLM calls it in
every process it starts (front end, engine core, workers), so it must be safe to call repeatedly.
"""

ARCHITECTURE = "BaichuanM1ForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    from m1_align.model import register as register_with_transformers

    # vLLM parses config.json with AutoConfig, which must know model_type "baichuan_m1"; the config class
    # writes the mixed `layer_types` list vLLM reads to tell full from sliding-window layers.
    register_with_transformers()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # a "module:Class" string: the model module (and torch) is imported only when vLLM builds the model
        ModelRegistry.register_model(ARCHITECTURE, "m1_align.model.vllm_model:BaichuanM1ForCausalLM")
