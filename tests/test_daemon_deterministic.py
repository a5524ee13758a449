"""`dsd start --deterministic`: a prompt's greedy tokens through the daemon are the same whether it
is served alone or beside three other prompts (continuous batching mixes their prefill chunks
and decode steps), in every placement.  The kernels' side is tests/test_batch_invariance.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.test_daemon_util import running_daemon
from tests.test_gguf_file import smollm2_path
from tests.tiny_moe import write_tiny_deepseek2

N_TOKENS = 16


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(2, vocab, size=n).tolist() for n in (37, 23, 41, 19)]


def _alone_and_together(run, prompts):
    kw = dict(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    client = run.client(timeout=300)
    alone = [client.generate(p, **kw).token_ids for p in prompts]
    together = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i):
        start.wait()
        together[i] = run.client(timeout=300).generate(prompts[i], **kw).token_ids  # a client each

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return alone, together


@pytest.mark.parametrize("model,placement", [("smollm2", "auto"), ("deepseek2", "experts"),
                                             ("deepseek2", "rows")])
def test_greedy_tokens_same_alone_and_beside_others(tmp_path, model, placement):
    if model == "smollm2":
        path, vocab = smollm2_path(), 49152
    else:
        path = write_tiny_deepseek2(str(tmp_path / "ds.gguf"), n_layers=3, E=16, k=4, F=128, D=64,
                                    qtype=Q.Q8_0, q_lora=32, seed=7)
        vocab = 96
    with running_daemon(tmp_path, "--model", path, "--nodes", "2", "--placement", placement,
                        "--prefill-chunk", "16", "--deterministic") as run:
        prompts = _prompts(vocab, 11)
        alone, together = _alone_and_together(run, prompts)
        assert all(len(t) == N_TOKENS for t in alone)
        for i, (a, b) in enumerate(zip(alone, together)):
            assert a == b, f"prompt {i}: alone {a} vs beside three others {b}"
