"""SmolLM2-135M-Instruct (Q4_1) against transformers loading the same GGUF file.

transformers dequantizes the GGUF with gguf-py and runs its own LlamaForCausalLM in float32,
so it shares no code with dsd's loader, kernels or model.
"""
import numpy as np
import pytest

from dsd.shard.model_path import default_model_path

PASSAGE = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. These early "
    "designs were heavy and awkward, and they were mostly a curiosity for wealthy young men. In the "
    "1860s, French mechanics added pedals to the front wheel, and the velocipede became a craze in "
    "Paris and London. Riders complained that the iron tires shook their bones, so the machines were "
    "nicknamed boneshakers. Later designers made the front wheel larger to travel farther with each "
    "turn of the pedals, which produced the famous high-wheeler. It was fast but dangerous, because a "
    "small stone could throw the rider over the handlebars. The safety bicycle of the 1880s solved this "
    "problem with two wheels of equal size, a chain that drove the rear wheel, and soon pneumatic tires "
    "filled with air. Within a decade millions of people owned one. Women in particular found new "
    "freedom, and the bicycle changed fashion, city streets, and the way people thought about travel. "
    "Today engineers still study its surprisingly subtle balance and steering."
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf():
    import os
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = default_model_path()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    return tok, model


@pytest.fixture(scope="module")
def engine():
    from dsd.shard.engine import Engine

    return Engine()


@pytest.mark.slow
def test_teacher_forced_top1_agreement(hf, engine):
    import torch

    tok, model = hf
    ids = tok(PASSAGE).input_ids
    assert len(ids) >= 200
    ids = ids[:220]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = engine.logits(ids)
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert agree >= 0.98, f"top-1 agreement {agree:.3f}"


@pytest.mark.slow
def test_first_16_greedy_chat_tokens_identical(hf, engine):
    import torch

    from dsd.shard.sampling import SamplingParams

    tok, model = hf
    ref_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if hasattr(ref_ids, "keys"):
        ref_ids = ref_ids["input_ids"]
    ids = engine.encode_chat(CHAT)
    assert ids == list(ref_ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    ref_new = out[0, len(ids):].tolist()
    params = SamplingParams(temperature=0.0, max_tokens=16)
    got = [s.token for s in engine.generate(ids, params)]
    assert got[:len(ref_new)] == ref_new
    assert len(ref_new) == 16 or ref_new[-1] in engine.tokenizer.stop_ids
