"""Token sampling and stop strings.

`Sampler.sample(logits, history)` applies, in this order:
  1. repetition penalty over the last `repeat_last_n` tokens of `history` (llama.cpp style:
     a positive logit is divided by the penalty, a negative one multiplied);
  2. top-k (0 = off);
  3. temperature (0 = greedy: argmax of the penalized logits, no randomness);
  4. top-p / nucleus over the top-k set, renormalized (1.0 = off);
  5. min-p: drop tokens whose probability is below min_p x the best token's (0 = off);
  6. draw from what is left with the sampler's own seeded numpy Generator.

Speed: a vocab is 49k-129k logits, and `np.argpartition` over all of them costs ~0.4-3 ms here.
So the top-k set is found exactly from a short candidate list: the k-th largest value of a strided
4096-sample is a threshold that at least k logits reach (the sampled ones do), and only the
~k*V/4096 logits above it are partitioned. Everything after top-k works on those few entries.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from dsd.errors import DsdError

_SAMPLE = 4096   # strided sample size for the top-k threshold


@dataclass
class SamplingParams:
    temperature: float = 0.8          # 0 = greedy
    top_k: int = 40                   # 0 = whole vocab
    top_p: float = 0.95               # (0, 1]; 1 = off
    min_p: float = 0.05               # [0, 1]; 0 = off
    repetition_penalty: float = 1.0   # 1 = off; >1 discourages repeats
    repeat_last_n: int = 64           # how many recent tokens the penalty looks at
    seed: int | None = None           # None = fresh entropy
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        """Raise DsdError naming the first bad field; returns self."""
        def bad(name: str, why: str):
            return DsdError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: {why}")

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(name, "must be an integer")
            return int(v)

        if num("temperature") < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if integer("top_k") < 0:
            raise bad("top_k", "must be >= 0 (0 disables top-k)")
        if not 0 < num("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1] (1 disables top-p)")
        if not 0 <= num("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1] (0 disables min-p)")
        if num("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if integer("repeat_last_n") < 0:
            raise bad("repeat_last_n", "must be >= 0")
        if self.seed is not None and not 0 <= integer("seed") < 2**64:
            raise bad("seed", "must be None or an integer in [0, 2**64)")
        if integer("max_tokens") < 1:
            raise bad("max_tokens", "must be >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        """Build from a plain dict (msgpack/JSON); missing keys take defaults, unknown keys and
        bad values raise DsdError."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DsdError(f"unknown sampling parameter(s) {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(known))}")
        if "stop" in d and d["stop"] is None:
            d["stop"] = []
        if isinstance(d.get("stop"), (list, tuple)):
            d["stop"] = list(d["stop"])
        return cls(**d).validate()


def _top_k_indices(l: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of the 1-D array `l` (any order)."""
    n = l.shape[0]
    if k >= n:
        return np.arange(n)
    step = n // _SAMPLE
    if step >= 4 and k < _SAMPLE // 2:
        sample = l[::step]
        # k-th largest sampled value: at least k entries of l (those samples) are >= it
        thr = np.partition(sample, sample.shape[0] - k)[sample.shape[0] - k]
        cand = np.flatnonzero(l >= thr)
        if cand.shape[0] > k:
            sub = l[cand]
            return cand[np.argpartition(sub, sub.shape[0] - k)[sub.shape[0] - k:]]
        return cand
    return np.argpartition(l, n - k)[n - k:]


def _draw(w: np.ndarray, u: float) -> int:
    """Index i with P(i) = w[i] / sum(w), for u uniform in [0, 1). A cumulative sum over a whole
    vocab costs ~0.5-2 ms; block sums first, then a cumulative sum inside one block."""
    n = w.shape[0]
    if n <= 8192:
        cw = np.cumsum(w.astype(np.float64))
        return min(int(np.searchsorted(cw, u * cw[-1], side="right")), n - 1)
    blk = 1024
    nb = n // blk
    sums = np.empty(nb + 1, dtype=np.float64)
    sums[:nb] = w[:nb * blk].reshape(nb, blk).sum(axis=1, dtype=np.float64)
    sums[nb] = w[nb * blk:].sum(dtype=np.float64)
    cb = np.cumsum(sums)
    b = min(int(np.searchsorted(cb, u * cb[-1], side="right")), nb)
    while sums[b] <= 0 and b > 0:      # rounding landed on an empty block: step back
        b -= 1
    rest = u * cb[-1] - (cb[b - 1] if b > 0 else 0.0)
    inner = np.cumsum(w[b * blk:(b + 1) * blk].astype(np.float64))
    return b * blk + min(int(np.searchsorted(inner, rest, side="right")), inner.shape[0] - 1)


class Sampler:
    """Picks the next token from one row of logits. One per sequence: it owns the RNG."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = (params or SamplingParams()).validate()
        self.rng = np.random.default_rng(self.params.seed)

    def penalize(self, logits: np.ndarray, history) -> np.ndarray:
        """Logits with the repetition penalty applied (a copy when anything changes)."""
        p = self.params
        pen, n = float(p.repetition_penalty), int(p.repeat_last_n)
        if pen == 1.0 or n == 0 or len(history) == 0:
            return logits
        ids = np.unique(np.asarray(history[-n:], dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < logits.shape[0])]
        out = logits.copy()
        v = out[ids]
        out[ids] = np.where(v > 0, v / pen, v * pen)
        return out

    @property
    def plain_greedy(self) -> bool:
        """The pick is argmax of the raw logits (no penalty): whoever holds them can make it."""
        p = self.params
        return p.temperature == 0 and (float(p.repetition_penalty) == 1.0 or int(p.repeat_last_n) == 0)

    def sample(self, logits: np.ndarray, history=()) -> int:
        p = self.params
        l = np.asarray(logits, dtype=np.float32).reshape(-1)
        l = self.penalize(l, history)
        n = l.shape[0]
        if p.temperature == 0:
            return int(np.argmax(l))
        # candidates: top-k set, or the whole vocab
        if 0 < p.top_k < n:
            cand = _top_k_indices(l, p.top_k)
            lc = l[cand].astype(np.float64)
        else:
            cand, lc = None, l
        m = float(lc.max())
        if not math.isfinite(m):
            return int(np.argmax(l))   # all -inf (or +inf): nothing to weigh
        # weights relative to the best token: w_best = 1, so min-p is simply w >= min_p
        w = np.exp((lc - m) * (1.0 / p.temperature))
        z = float(w.sum(dtype=np.float64))
        keep = np.flatnonzero(w >= p.min_p) if p.min_p > 0 else None
        if p.top_p < 1:
            if keep is None:
                keep = np.arange(w.shape[0])
            # min-p and top-p both keep a head of the descending order; only the part of that
            # head holding top_p of the mass needs sorting (grow k until it holds enough)
            if keep.shape[0] > _SAMPLE:
                k = 256
                while k < keep.shape[0]:
                    head = _top_k_indices(w, k)
                    if w[head].sum(dtype=np.float64) >= p.top_p * z:
                        keep = head
                        break
                    k *= 4
            order = keep[np.argsort(-w[keep], kind="stable")]
            cw = np.cumsum(w[order], dtype=np.float64)
            cut = int(np.searchsorted(cw, p.top_p * z, side="left")) + 1
            if cut < order.shape[0]:
                order, cw = order[:cut], cw[:cut]
            i = int(np.searchsorted(cw, self.rng.random() * cw[-1], side="right"))
            pick = order[min(i, order.shape[0] - 1)]
        else:                               # no top-p: no ordering needed
            if keep is None:
                pick = _draw(w, self.rng.random())
            else:
                pick = keep[_draw(w[keep], self.rng.random())]
        return int(cand[pick]) if cand is not None else int(pick)


class StopStrings:
    """Incremental stop-string matching over streamed text.

    push(text) returns (text safe to show, stopped). Text that could be the start of a stop
    string is held back until it is ruled out; on a match everything from the stop string on
    is dropped and stopped is True (later pushes return ("", True)). flush() returns what is
    still held back (call it when generation ends for another reason).
    """

    def __init__(self, stops=()):
        self.stops = [s for s in (stops or []) if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        first = -1
        for s in self.stops:
            at = buf.find(s)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self._held, self.stopped = "", True
            return buf[:first], True
        hold = 0
        for s in self.stops:
            for ln in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:ln]):
                    hold = ln
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return "" if self.stopped else out
