"""Model architectures, one module each; `build_model` picks one from general.architecture."""
from __future__ import annotations

import importlib

from dsd.errors import UnsupportedModelError

# general.architecture -> module in dsd.shard.models
ARCHITECTURES = {
    "llama": "llama",
    "deepseek2": "deepseek2",
    "qwen3moe": "qwen3_moe",
    "qwen2": "qwen",
    "qwen3": "qwen",
    "glm4moe": "glm4_moe",
    "gpt-oss": "gpt_oss",
}


def _gpt_oss_spec(g, m, s):
    from dsd.shard.models.gpt_oss import gguf_spec

    return gguf_spec(g, m, s)


def _register_gguf_specs() -> None:
    """gguf_check's tensor spec of the architectures whose spec lives in their model module
    (gpt-oss; check_model imports this package before it looks its spec up)."""
    from dsd.shard import gguf_check

    gguf_check._SPECS.setdefault("gpt-oss", _gpt_oss_spec)


_register_gguf_specs()


def build_model(gguf_model, weights=None):
    """Build the model object for an opened GGUF file; weights defaults to the memory-mapped file."""
    from dsd.shard.gguf_check import check_model
    from dsd.shard.weights import GGUFWeights

    arch = gguf_model.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_model.path}: architecture {arch!r} is not supported; dsd runs "
            f"{', '.join(sorted(ARCHITECTURES))}")
    # every tensor's type and shape against the metadata, before any is used (shard/gguf_check.py)
    check_model(gguf_model)
    mod = importlib.import_module(f"dsd.shard.models.{ARCHITECTURES[arch]}")
    weights = weights or GGUFWeights(gguf_model)
    return mod.build(gguf_model, weights)
