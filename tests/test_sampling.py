"""Sampler, SamplingParams and StopStrings: structural and statistical checks."""
import numpy as np
import pytest

from dsd.errors import DsdError
from dsd.shard.sampling import Sampler, SamplingParams, StopStrings, _draw, _top_k_indices


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def freqs(params: SamplingParams, logits, n=4000, history=()) -> np.ndarray:
    s = Sampler(params)
    counts = np.zeros(len(logits))
    for _ in range(n):
        counts[s.sample(logits, list(history))] += 1
    return counts / n


def rand_logits(v=49152, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(v) * 3).astype(np.float32)


def test_greedy_and_top_k_1_equal_argmax():
    for seed in range(5):
        l = rand_logits(seed=seed)
        a = int(np.argmax(l))
        assert Sampler(SamplingParams(temperature=0)).sample(l, []) == a
        assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed)).sample(l, []) == a
        # a tiny top_p keeps only the best token
        p = SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, min_p=0, seed=seed)
        assert Sampler(p).sample(l, []) == a


def test_top_k_indices_exact():
    for v, k in [(49152, 40), (129280, 40), (1000, 10), (129280, 1), (50000, 3000)]:
        l = rand_logits(v, seed=v + k)
        got = np.sort(_top_k_indices(l, k))
        want = np.sort(np.argsort(-l, kind="stable")[:k])
        assert np.array_equal(got, want)


def test_distribution_matches_softmax():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    f = freqs(p, logits_of(probs), n=20000)
    assert np.abs(f - probs).max() < 0.02
    # temperature 0.5 squares the odds
    sharp = probs ** 2 / (probs ** 2).sum()
    p.temperature = 0.5
    assert np.abs(freqs(p, logits_of(probs), n=20000) - sharp).max() < 0.02


def test_block_draw_on_large_vocab():
    w = np.zeros(100_000, dtype=np.float32)
    w[[5, 50_000, 99_999]] = [1.0, 2.0, 1.0]
    rng = np.random.default_rng(3)
    picks = np.array([_draw(w, rng.random()) for _ in range(8000)])
    assert set(np.unique(picks)) == {5, 50_000, 99_999}
    assert abs((picks == 50_000).mean() - 0.5) < 0.03


def test_top_p_and_min_p_filter():
    l = logits_of([0.5, 0.3, 0.15, 0.05])
    # top-p 0.75: 0.5 < 0.75 <= 0.8 -> tokens {0, 1}, renormalized 5:3
    f = freqs(SamplingParams(temperature=1, top_k=0, top_p=0.75, min_p=0, seed=1), l, n=8000)
    assert f[2] == 0 and f[3] == 0 and abs(f[0] - 0.625) < 0.03
    # min-p 0.35: keep p >= 0.175 -> {0, 1}
    f = freqs(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.35, seed=1), l, n=8000)
    assert f[2] == 0 and f[3] == 0 and f[1] > 0.3
    # min-p 0.2: 0.15 >= 0.1 stays, 0.05 goes
    f = freqs(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.2, seed=1), l, n=8000)
    assert f[2] > 0 and f[3] == 0
    # top-k 2 then the rest
    f = freqs(SamplingParams(temperature=1, top_k=2, top_p=1, min_p=0, seed=1), l, n=8000)
    assert set(np.flatnonzero(f)) == {0, 1}


def test_filters_on_real_sized_vocab():
    l = rand_logits(129280, seed=11)
    top = set(np.argsort(-l)[:40].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, seed=2))
    got = {s.sample(l, []) for _ in range(500)}
    assert got <= top and len(got) > 5
    # min-p over the whole vocab: everything drawn is within the threshold
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=2))
    for _ in range(200):
        assert l[s.sample(l, [])] >= l.max() + np.log(0.5) - 1e-4


def test_repetition_penalty_changes_argmax():
    l = np.array([2.0, 1.9, -1.0, -1.5], dtype=np.float32)
    g = SamplingParams(temperature=0)
    assert Sampler(g).sample(l, [0]) == 0
    g.repetition_penalty = 1.2            # 2.0 / 1.2 = 1.67 < 1.9
    assert Sampler(g).sample(l, [0, 0]) == 1
    # negative logits are multiplied (pushed further down), not divided
    s = Sampler(g)
    out = s.penalize(l, [2, 3])
    assert np.allclose(out, [2.0, 1.9, -1.2, -1.8])
    # only the last repeat_last_n tokens count
    g.repeat_last_n = 1
    assert Sampler(g).sample(l, [0, 3]) == 0
    assert np.allclose(l, [2.0, 1.9, -1.0, -1.5])   # input untouched


def test_seed_reproducible():
    l = rand_logits(49152, seed=5)
    p = SamplingParams(temperature=1.2, top_k=100, top_p=0.99, min_p=0.0, seed=42)

    def run(params):
        s, hist = Sampler(params), []
        for _ in range(50):
            hist.append(s.sample(l, hist))
        return hist

    a, b = run(p), run(p)
    assert a == b
    p2 = SamplingParams(**{**p.to_dict(), "seed": 43})
    assert run(p2) != a


def test_params_validate_and_from_dict():
    for field, value in [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -1),
                         ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0), ("max_tokens", 0),
                         ("temperature", float("nan")), ("seed", -1), ("stop", [""]),
                         ("ignore_eos", "yes"), ("temperature", True)]:
        with pytest.raises(DsdError, match=field):
            SamplingParams(**{field: value}).validate()
    p = SamplingParams.from_dict({"temperature": 0, "stop": ("a", "b"), "seed": 3})
    assert p.temperature == 0 and p.stop == ["a", "b"] and p.top_k == 40
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict(None) == SamplingParams()
    with pytest.raises(DsdError, match="temprature"):
        SamplingParams.from_dict({"temprature": 1})
    with pytest.raises(DsdError, match="top_p"):
        Sampler(SamplingParams(top_p=2))


# ---------------------------------------------------------------- stop strings
def run_stops(stops, chunks):
    st = StopStrings(stops)
    out, stopped = "", False
    for c in chunks:
        text, stopped = st.push(c)
        out += text
        if stopped:
            break
    if not stopped:
        out += st.flush()
    return out, stopped


def test_stop_split_across_chunks():
    assert run_stops(["</end>"], ["Hello </", "en", "d> more"]) == ("Hello ", True)
    assert run_stops(["###"], ["a#", "#", "b##", "#c"]) == ("a##b", True)
    # a false start is released once ruled out
    st = StopStrings(["STOP"])
    assert st.push("ST") == ("", False)
    assert st.push("AR") == ("STAR", False)
    assert st.push("x STO") == ("x ", False)
    assert st.flush() == "STO"


def test_stop_earliest_of_several_and_no_stops():
    assert run_stops(["bb", "abc"], ["xxab", "bc"]) == ("xxa", True)
    assert run_stops(["lo w", "o"], ["hel", "lo world"]) == ("hel", True)   # "lo w" starts first
    assert run_stops([], ["a", "b"]) == ("ab", False)
    assert run_stops(["zz"], ["no", " stop"]) == ("no stop", False)
    st = StopStrings(["x"])
    assert st.push("ax") == ("a", True)
    assert st.push("more") == ("", True) and st.flush() == ""


def test_stop_random_chunking_equals_whole():
    rng = np.random.default_rng(0)
    text = "the cat sat on the mat. <|user|> then more text"
    for _ in range(200):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=rng.integers(0, 10), replace=False))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert run_stops(["<|user|>", "mat!"], chunks) == ("the cat sat on the mat. ", True)
