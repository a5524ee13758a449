"""Batch invariance (registry.batch_invariant / DSD_DETERMINISTIC=1): a token's product row is
bit-identical whether it is computed alone (matvec), in a small batch, in a prompt-sized batch, or
through the gathered expert path -- for every weight type, serial and parallel, with the 8-bit
activation path where this CPU has it and with float activations.

Without the mode only the K-quants' 8-bit kernels promise this (their multi-token kernel runs the
one-token kernel's arithmetic per token); the float kernels share a decoded row across tokens
(mm_fused) or hand the product to sgemm, whose blocking depends on T."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G

from dsd.shard.kernels import matmul, matvec, matvec_gather, registry
from dsd.shard.kernels import batch_invariant, exact_activations

from .test_kernels import ALL, random_raw

TOKEN_COUNTS = (2, 3, 8, 16, 17, 40)  # decode batches, the fused-kernel limit, prompt chunks


def _cols(gt):
    # 320: a Q8_0 pair tail; one block per row (32, MLA's q_lora in tiny models) is its own case
    return (256, 512) if gt in (G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K) else (32, 320)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float-x"])
@pytest.mark.parametrize("gt", ALL, ids=lambda g: g.name)
def test_token_row_same_alone_batched_and_gathered(gt, int8, parallel, monkeypatch):
    if int8 and not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: no 8-bit activation path to check (float-x runs)")
    monkeypatch.setattr(registry, "PAR_MIN_BYTES", 0 if parallel else 1 << 62)
    for n in _cols(gt):
        _check_alone_batched_gathered(gt, n, int8, np.random.default_rng(int(gt) * 7 + int8 + n))


def _check_alone_batched_gathered(gt, n, int8, rng):
    stack = np.stack([random_raw(gt, 40, n, rng, True) for _ in range(2)])
    X = rng.standard_normal((max(TOKEN_COUNTS), n)).astype(np.float32)
    X[3] *= 40  # one token with large activations (its own 8-bit scales)
    ctx = batch_invariant() if int8 else _both(batch_invariant(), exact_activations())
    with ctx:
        alone = np.stack([matvec(stack[1], int(gt), X[t]) for t in range(X.shape[0])])
        for T in TOKEN_COUNTS:
            got = matmul(stack[1], int(gt), X[:T])
            bad = np.flatnonzero(np.any(got != alone[:T], axis=1))
            assert bad.size == 0, f"T={T}: tokens {bad} differ from matvec (max {np.abs(got - alone[:T]).max()})"
        ids, xi = [1, 0, 1, 1], [0, 5, 3, 7]
        got = matvec_gather(stack, int(gt), ids, X, xi)
        for i, (e, t) in enumerate(zip(ids, xi)):
            want = alone[t] if e == 1 else matvec(stack[0], int(gt), X[t])
            assert np.array_equal(got[i], want), (i, e, t)


class _both:
    def __init__(self, *ctxs):
        self.ctxs = ctxs

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def test_default_mode_k_quant_int8_kernels_are_invariant():
    """The K-quants' 8-bit path holds the property without the mode (decode batches of any size
    compute each token as matvec does)."""
    if not registry.INT8_ACTIVATIONS:
        pytest.skip("this CPU has no AVX-512 VNNI: K-quants run the float kernels")
    rng = np.random.default_rng(3)
    for gt in (G.Q4_K, G.Q5_K, G.Q6_K):
        raw = random_raw(gt, 64, 512, rng, False)
        X = rng.standard_normal((24, 512)).astype(np.float32)
        alone = np.stack([matvec(raw, int(gt), x) for x in X])
        for T in (2, 9, 24):
            assert np.array_equal(matmul(raw, int(gt), X[:T]), alone[:T]), (gt.name, T)


def test_mode_is_off_by_default_and_scoped():
    assert registry.BATCH_INVARIANT is False or registry.BATCH_INVARIANT is True
    before = registry.BATCH_INVARIANT
    with batch_invariant():
        assert registry.BATCH_INVARIANT is True
        with batch_invariant(False):
            assert registry.BATCH_INVARIANT is False
        assert registry.BATCH_INVARIANT is True
    assert registry.BATCH_INVARIANT is before


# -- end to end: a sequence's logits do not depend on what it is batched with -----------------

def _step(model, work):
    """One forward batch over [(cache, new tokens)] -> the last row of logits of each sequence."""
    from dsd.shard.batch import Batch, Segment

    toks, pos, segs, rows, start = [], [], [], [], 0
    for cache, new in work:
        n = len(new)
        segs.append(Segment(cache, start, n, cache.length))
        toks += list(new)
        pos += range(cache.length, cache.length + n)
        start += n
        rows.append(start - 1)
    b = Batch(tokens=np.asarray(toks, np.int64), positions=np.asarray(pos, np.int64), segments=segs,
              logit_rows=np.asarray(rows))
    return model.forward(b)


def _run(model, prompts, chunks, steps):
    """Greedy-decode every prompt together: prefill in rounds of `chunks` tokens per prompt (a
    prompt's last chunk may share a batch with others' decode steps), then `steps` decode
    batches.  Returns each prompt's logits rows (one per generated token)."""
    caches = [model.new_cache(128) for _ in prompts]
    todo = [list(p) for p in prompts]
    out = [[] for _ in prompts]
    while any(len(o) < steps for o in out):
        work, who = [], []
        for i, c in enumerate(caches):
            if todo[i]:
                n = chunks[i] or len(todo[i])
                work.append((c, todo[i][:n]))
                todo[i] = todo[i][n:]
                who.append((i, not todo[i]))  # logits count once the prompt is in
            elif len(out[i]) < steps:
                work.append((c, [int(np.argmax(out[i][-1]))]))
                who.append((i, True))
        logits = _step(model, work)
        for (i, keep), row in zip(who, logits):
            if keep:
                out[i].append(row.copy())
    return [np.stack(o) for o in out]


def _models(tmp_path):
    from .test_gguf_file import smollm2_path
    from .tiny_moe import write_tiny_deepseek2, write_tiny_qwen3moe

    yield "smollm2", smollm2_path()
    yield "qwen3moe", write_tiny_qwen3moe(tmp_path / "q3.gguf", qtype=G.Q8_0, seed=4)
    yield "deepseek2", write_tiny_deepseek2(tmp_path / "ds.gguf", qtype=G.Q8_0, q_lora=32, seed=5)


def test_greedy_logits_same_alone_beside_others_and_chunked(tmp_path):
    """With the mode on, a prompt's logits are bit-identical whether it runs alone (one prefill
    batch), beside three other prompts (one prefill batch of ~80 tokens, then decode batches of
    4), or prefilled in chunks of 7 while others decode -- for a dense model and two MoE models
    (DeepSeek's MLA and shared experts, Qwen3's per-head norms).  Without it SmolLM2's prompt
    products run sgemm, whose sums depend on the batch: the same comparison differs."""
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.models import build_model

    rng = np.random.default_rng(0)
    for name, path in _models(tmp_path):
        model = build_model(open_gguf(path))
        vocab = model.args.vocab_size
        prompts = [rng.integers(1, vocab, size=n).tolist() for n in (21, 18, 25, 17)]
        with batch_invariant():
            alone = _run(model, prompts[:1], [0], 6)[0]
            together = _run(model, prompts, [0, 0, 0, 0], 6)
            chunked = _run(model, prompts[1::-1], [0, 7], 6)[1]  # prompt 0 in chunks of 7
        for label, got in (("beside 3 others", together[0]), ("chunked by 7", chunked)):
            assert np.array_equal(got, alone), f"{name}: logits {label} differ from alone " \
                f"(max {np.abs(got - alone).max():.3g}, greedy {got.argmax(1)} vs {alone.argmax(1)})"
        if name == "smollm2":
            with batch_invariant(False):
                a = _run(model, prompts[:1], [0], 2)[0]
                b = _run(model, prompts, [0, 0, 0, 0], 2)[0]
            assert not np.array_equal(a, b), "default mode unexpectedly batch-invariant: the mode's cost may be avoidable"
