"""llama.cpp's own batched decode on the same GGUF file: the yardstick for "B streams vs one
stream".  One llama.cpp context with B sequences; each step decodes one token of every sequence
in one llama_decode call (what llama-server does with --parallel B), greedy.  Prints the step
time at batch 1 and batch B, interleaved over rounds, and the aggregate ratio.

    python bench/llama_batched.py /tmp/dsd-bench-synth-L4.gguf --batch 8 --threads 2 --rounds 3

Optional tool (needs llama-cpp-python); CI never runs it.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        sys.exit(f"llama.cpp could not load {args.model}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    B = args.batch
    per_seq = 16 + args.steps * (args.rounds + 1)
    cp = L.llama_context_default_params()
    cp.n_ctx = per_seq * B
    cp.n_batch = max(512, B)
    cp.n_seq_max = B
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(max(512, B), 0, B)
    pos = [0] * B
    last = [0] * B

    def decode(items):  # items: [(seq, [tokens])]; logits for each sequence's last token
        batch.n_tokens = 0
        outs = []
        for s, toks in items:
            for j, t in enumerate(toks):
                i = batch.n_tokens
                batch.token[i] = t
                batch.pos[i] = pos[s]
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = s
                batch.logits[i] = j == len(toks) - 1
                if batch.logits[i]:
                    outs.append((s, i))
                pos[s] += 1
                batch.n_tokens += 1
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed")
        for s, i in outs:
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            last[s] = int(np.argmax(row))

    for s in range(B):  # distinct 11-token prompts, as bench/daemon_bench.py sends
        decode([(s, [1] + list(range(200 + 7 * s, 210 + 7 * s)))])

    def steps(n_seq: int) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            decode([(s, [last[s]]) for s in range(n_seq)])
        return (time.perf_counter() - t0) / args.steps

    steps(B)  # warm-up
    t1s, tbs = [], []
    for r in range(args.rounds):
        t1, tb = steps(1), steps(B)
        t1s.append(t1)
        tbs.append(tb)
        print(f"round {r}: batch 1 {t1 * 1e3:.1f} ms/step ({1 / t1:.1f} tok/s), batch {B} "
              f"{tb * 1e3:.1f} ms/step ({B / tb:.1f} tok/s): {B * t1 / tb:.2f}x", flush=True)
    t1, tb = statistics.median(t1s), statistics.median(tbs)
    print(f"llama.cpp {L.__version__}, {args.threads} threads: batch {B} aggregate = "
          f"{B * t1 / tb:.2f}x batch 1 (medians: {t1 * 1e3:.1f} / {tb * 1e3:.1f} ms per step)")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
