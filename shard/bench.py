"""Benchmarks behind `dsd bench`: engine prefill/decode speed, weight bytes read per token,
the machine's read bandwidth (STREAM-like), and optionally llama.cpp on the same file."""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def _sum_f64(a):  # read-bandwidth kernel: one vectorised pass over a [n] float64 array
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N read bandwidth in GB/s over an array larger than the caches."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    _sum_f64(a[:1024])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _sum_f64(a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def synthetic_prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    """n token ids drawn from the lower vocabulary (ordinary tokens; past the first 100, which
    hold the special ones in real vocabularies, when there are more than 200), reproducible."""
    rng = np.random.default_rng(seed)
    return rng.integers(100 if vocab > 200 else 0, min(vocab, 20000), size=n).tolist()


def bench_engine(engine, prompt_tokens: int = 512, decode_tokens: int = 128) -> dict:
    from dsd.shard.batch import Batch
    from dsd.shard.weights import ReadCounter

    model = engine.model
    ids = synthetic_prompt(model.args.vocab_size, prompt_tokens)
    # warm-up: compile/load every kernel specialisation used below (after a code change numba
    # compiles them, seconds each; measured: a first run's decode at 0.2x of the next run's),
    # serial and parallel, as a daemon worker does before it reports ready
    from dsd.shard import kernels

    kernels.warm_up({t.ggml_type for t in engine.gguf.tensors.values()})
    warm = model.new_cache(64)
    model.forward(Batch.single(warm, ids[:8]))
    for t in ids[-2:]:
        model.forward(Batch.single(warm, [t]))

    # prefill twice: the first prompt also faults in the weights it touches (in one process they
    # are views of the file's mmap); the second is the steady state of a running server
    t_first = 0.0
    for _ in range(2):
        cache = model.new_cache(prompt_tokens + decode_tokens + 1)
        t0 = time.perf_counter()
        logits = model.forward(Batch.single(cache, ids))
        t_prefill = time.perf_counter() - t0
        t_first = t_first or t_prefill

    tok = int(np.argmax(logits[-1]))
    ReadCounter.reset()
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = model.forward(Batch.single(cache, [tok]))
        tok = int(np.argmax(logits[-1]))
    t_decode = time.perf_counter() - t0
    bytes_per_token = ReadCounter.reset() / decode_tokens
    decode_tok_s = decode_tokens / t_decode
    return {
        "model": engine.path,
        "threads": engine.threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prefill_tok_s": prompt_tokens / t_prefill,
        "prefill_first_tok_s": prompt_tokens / t_first,
        "decode_tok_s": decode_tok_s,
        "decode_ms_per_token": 1000.0 / decode_tok_s,
        "bytes_per_token": bytes_per_token,
        "effective_gb_s": bytes_per_token * decode_tok_s / 1e9,
    }


def bench_llama_cpp(path: str, threads: int, prompt_tokens: int = 512, decode_tokens: int = 128) -> dict:
    """llama.cpp (llama-cpp-python) on the same file, same thread count, same token counts."""
    import llama_cpp

    n_ctx = prompt_tokens + decode_tokens + 16
    # n_batch = n_ctx only sizes llama-cpp-python's score buffer (one row per position); the
    # compute micro-batch (n_ubatch) stays at llama.cpp's default of 512.
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=n_ctx, verbose=False)
    ids = synthetic_prompt(llm.n_vocab(), prompt_tokens)
    llm.eval(ids[:8])  # warm-up
    t_first = 0.0
    for _ in range(2):  # first prompt, then the steady state (as bench_engine)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t_prefill = time.perf_counter() - t0
        t_first = t_first or t_prefill
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t_decode = time.perf_counter() - t0
    return {"llama_cpp_version": llama_cpp.__version__, "prefill_tok_s": prompt_tokens / t_prefill,
            "prefill_first_tok_s": prompt_tokens / t_first, "decode_tok_s": decode_tokens / t_decode}


def profile_decode(engine, decode_tokens: int = 64, context: int = 512) -> dict:
    """Where decode time goes at `context` cached tokens, measured per decoded token: kernel
    calls and numba parallel regions, wall time inside numba kernels (weight products,
    attention, norms / RoPE; kernels.stats) and outside them (Python glue, numpy temporaries,
    routing, argmax): step time minus the kernels' own wall time."""
    from dsd.shard.batch import Batch
    from dsd.shard.kernels import stats

    model = engine.model
    cache = model.new_cache(context + decode_tokens + 16)
    prompt = synthetic_prompt(model.args.vocab_size, context)
    model.forward(Batch.single(cache, prompt))
    tok = prompt[-1]
    for _ in range(2):  # load every specialisation this context length uses
        tok = int(np.argmax(model.forward(Batch.single(cache, [tok]))[-1]))
    stats.reset()
    stats.enabled = True
    try:
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = int(np.argmax(model.forward(Batch.single(cache, [tok]))[-1]))
        total = time.perf_counter() - t0
    finally:
        stats.enabled = False
    n = decode_tokens
    per = stats.snapshot(n)
    attn = {k: v for k, v in per.items() if k.startswith("attention")}
    elem = {k: v for k, v in per.items() if k in ("rms_norm_rows", "rope_rows")}
    weights = {k: v for k, v in per.items() if k not in attn and k not in elem}
    inside = sum(v[2] for v in per.values())
    return {"context": context, "ms_per_token": 1000 * total / n,
            "ms_in_weight_products": 1000 * sum(v[2] for v in weights.values()),
            "ms_in_attention": 1000 * sum(v[2] for v in attn.values()),
            "ms_in_norm_rope": 1000 * sum(v[2] for v in elem.values()),
            "ms_outside_kernels": 1000 * (total / n - inside),
            "outside_fraction": (total / n - inside) / (total / n),
            "kernel_calls_per_token": sum(v[0] for v in per.values()),
            "parallel_regions_per_token": sum(v[1] for v in per.values()),
            "kernels": {k: {"calls": v[0], "parallel_regions": v[1], "ms": 1000 * v[2]}
                        for k, v in sorted(per.items(), key=lambda kv: -kv[1][2])}}


def batch_prompts(vocab: int, batch: int) -> list[list[int]]:
    """Distinct 11-token prompts, one per sequence (as bench/daemon_bench.py sends)."""
    lo = 100 if vocab > 400 else 0
    return [[1] + [lo + (7 * i + j) % (vocab - lo) for j in range(10)] for i in range(batch)]


def bench_batched(engine, batch: int, steps: int = 16, rounds: int = 3) -> dict:
    """Continuous-batching decode in one process: step time with 1 sequence and with `batch`
    sequences (one token each per forward), interleaved over rounds; medians.  The aggregate
    ratio is what "B streams vs one stream" can reach without any process hand-over."""
    from dsd.shard.batch import Batch

    model = engine.model
    caches = [model.new_cache(16 + steps * (rounds + 1) * 2) for _ in range(batch)]
    last = []
    for c, ids in zip(caches, batch_prompts(model.args.vocab_size, batch)):
        b = Batch.single(c, ids)
        last.append(int(np.argmax(model.forward(b)[-1])))
        b.finish()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            b = Batch.decode(caches[:n], np.asarray(last[:n]))
            logits = model.forward(b)
            b.finish()
            last[:n] = np.argmax(logits, axis=-1).tolist()
        return (time.perf_counter() - t0) / steps

    return _interleaved(run, batch, rounds)


def _interleaved(run, batch: int, rounds: int) -> dict:
    """run(n) -> seconds per step with n sequences: a warm-up at `batch` (compiles / loads the
    batched kernels), then 1 and `batch` sequences in turn for `rounds` rounds; medians."""
    run(batch)
    t1, tb = [], []
    for _ in range(rounds):
        t1.append(run(1))
        tb.append(run(batch))
    t1, tb = float(np.median(t1)), float(np.median(tb))
    return {"batch": batch, "step_ms_1": 1e3 * t1, "step_ms_batch": 1e3 * tb,
            "decode_tok_s_1": 1 / t1, "aggregate_tok_s": batch / tb, "ratio": batch * t1 / tb}


def bench_llama_cpp_batched(path: str, threads: int, batch: int, steps: int = 16, rounds: int = 3) -> dict:
    """llama.cpp's own batched decode on the same file: one context with `batch` sequences, one
    token of each per llama_decode call (what llama-server --parallel does), greedy; step times
    with 1 and `batch` sequences interleaved as in bench_batched."""
    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx = batch * (16 + steps * (rounds + 1) * 2)
    cp.n_batch = max(512, batch)
    cp.n_seq_max = batch
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    lb = L.llama_batch_init(max(512, batch), 0, batch)
    pos, last = [0] * batch, [0] * batch
    try:
        def decode(items):  # [(seq, tokens)]: logits of each sequence's last token -> argmax
            lb.n_tokens, outs = 0, []
            for s, toks in items:
                for j, t in enumerate(toks):
                    i = lb.n_tokens
                    lb.token[i], lb.pos[i], lb.n_seq_id[i] = t, pos[s], 1
                    lb.seq_id[i][0] = s
                    lb.logits[i] = j == len(toks) - 1
                    if lb.logits[i]:
                        outs.append((s, i))
                    pos[s] += 1
                    lb.n_tokens += 1
            if L.llama_decode(ctx, lb) != 0:
                raise RuntimeError("llama_decode failed")
            for s, i in outs:
                last[s] = int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

        for s, ids in enumerate(batch_prompts(n_vocab, batch)):
            decode([(s, ids)])

        def run(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                decode([(s, [last[s]]) for s in range(n)])
            return (time.perf_counter() - t0) / steps

        res = _interleaved(run, batch, rounds)
    finally:
        L.llama_batch_free(lb)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return dict(res, llama_cpp_version=L.__version__)
