"""llama.cpp's own forward pass on a GGUF file, through the llama-imatrix yardstick binary
(bench/build_yardsticks.sh; ~/.cache/dsd-yardsticks/llama.cpp, DSD_YARDSTICKS_DIR overrides):
its perplexity printout, turned into a mean next-token NLL per chunk, next to the same numbers
from any logits function (dsd, transformers).

llama-imatrix evaluates chunks of n_ctx tokens and scores the second half of each: positions
i = n_ctx/2 .. n_ctx-2 predicting token i + 1; it prints the cumulative perplexity after each
chunk as [k]value, so chunk k's mean NLL is k ln P_k - (k - 1) ln P_(k-1) (equal counts).
"""
from __future__ import annotations

import os
import re
import subprocess

import numpy as np


def llama_imatrix() -> str | None:
    from dsd.shard.yardstick import yardsticks_dir

    path = os.path.join(yardsticks_dir(), "llama.cpp", "llama-imatrix")
    return path if os.access(path, os.X_OK) else None


def sample_text(n_words: int = 1200, seed: int = 0) -> str:
    words = ("the quick brown fox jumps over lazy dog numbers 12345 and words punctuation more "
             "text here river stone cloud").split()
    return " ".join(np.random.default_rng(seed).choice(words, n_words)) + "."


def llama_cpp_chunk_nll(model_path: str, text: str, n_ctx: int, n_chunks: int, work_dir) -> np.ndarray:
    """[n_chunks] mean NLL per chunk by llama.cpp (no BOS added, 2 threads)."""
    txt = os.path.join(str(work_dir), "ppl.txt")
    with open(txt, "w") as f:
        f.write(text)
    r = subprocess.run([llama_imatrix(), "-m", model_path, "-f", txt, "-c", str(n_ctx), "--chunks", str(n_chunks),
                        "-t", "2", "-o", os.path.join(str(work_dir), "imatrix.gguf"),
                        "--override-kv", "tokenizer.ggml.add_bos_token=bool:false"],
                       capture_output=True, text=True, timeout=600)
    ppl = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", r.stdout + r.stderr)]
    assert len(ppl) == n_chunks, (r.stdout + r.stderr)[-2000:]
    cum = np.log(np.array(ppl)) * np.arange(1, n_chunks + 1)
    return np.diff(np.concatenate([[0.0], cum]))


def chunk_nll(logits_fn, ids: list[int], n_ctx: int, n_chunks: int) -> np.ndarray:
    """The same per-chunk mean NLL from logits_fn(chunk ids) -> [n_ctx, vocab], in float64."""
    out = []
    for c in range(n_chunks):
        ch = ids[c * n_ctx:(c + 1) * n_ctx]
        assert len(ch) == n_ctx, "text too short for n_chunks x n_ctx tokens"
        lg = np.asarray(logits_fn(ch), np.float64)
        s = 0.0
        for i in range(n_ctx // 2, n_ctx - 1):
            row = lg[i] - lg[i].max()
            s -= row[ch[i + 1]] - np.log(np.exp(row).sum())
        out.append(s / (n_ctx - 1 - n_ctx // 2))
    return np.array(out)
