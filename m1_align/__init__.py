"""m1-align: post-training for medical language models (SFT, ELO, TDPO, reward models, PPO, GRPO).

`import m1_align` registers the Baichuan-M1 hybrid model (model_type "baichuan_m1") with transformers'
Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)` loads it without trust_remote_code. The
registration waits until transformers itself is imported, so importing m1_align (and starting the CLI)
stays cheap.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register_with_transformers() -> None:
    try:
        import m1_align.model  # noqa: F401  (registers on import)
    except Exception as e:  # never break the user's `import transformers`
        warnings.warn(f"m1_align could not register baichuan_m1 with transformers: {e}", stacklevel=2)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs the registration right after `transformers` finishes importing, then removes itself. It stays
    in place until then: libraries probe with importlib.util.find_spec("transformers") without importing."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register_with_transformers()

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
