"""A forward batch: several sequences' new tokens flattened into one [T] array (nano-vllm style).

Prefill of one prompt is one segment of n tokens; continuous-batching decode is many segments of
one token each.  Matrix products run over all T tokens at once; attention runs per segment
against that segment's own cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsd.shard.kv_cache import SequenceCache


@dataclass
class Segment:
    cache: SequenceCache
    start: int  # index of the segment's first token in the flat batch
    n: int      # number of new tokens
    pos0: int   # absolute position of the first new token (= tokens already cached)


@dataclass
class Batch:
    tokens: np.ndarray             # int64 [T]
    positions: np.ndarray          # int64 [T]
    segments: list[Segment]
    logit_rows: np.ndarray | None = None  # rows of T to compute logits for (None = all)

    @classmethod
    def single(cls, cache: SequenceCache, tokens, pos0: int | None = None,
               all_logits: bool = False) -> "Batch":
        """One sequence continuing from its cache (pos0 defaults to cache.length)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        pos0 = cache.length if pos0 is None else pos0
        n = len(tokens)
        return cls(tokens=tokens, positions=np.arange(pos0, pos0 + n, dtype=np.int64),
                   segments=[Segment(cache, 0, n, pos0)],
                   logit_rows=None if all_logits else np.array([n - 1]))

    @classmethod
    def decode(cls, caches: list[SequenceCache], tokens) -> "Batch":
        """One new token for each of several sequences."""
        tokens = np.asarray(tokens, dtype=np.int64)
        segs = [Segment(c, i, 1, c.length) for i, c in enumerate(caches)]
        return cls(tokens=tokens, positions=np.array([c.length for c in caches], dtype=np.int64),
                   segments=segs, logit_rows=None)

    @classmethod
    def of_sequences(cls, caches: dict, new_cache, tokens, seqs, ns, pos0, logit_rows=None,
                     caps=None) -> "Batch":
        """The batch of a step descriptor: segment k is ns[k] new tokens of sequence seqs[k]
        from position pos0[k], its cache caches[seqs[k]] (made with new_cache(caps[k]) the first
        time: caps[k] = the positions it may grow to, or None)."""
        segs, pos, start = [], [], 0
        for k, (sid, n, p0) in enumerate(zip(seqs, ns, pos0)):
            c = caches.get(sid)
            if c is None:
                c = caches[sid] = new_cache(caps[k] if caps else None)
            segs.append(Segment(c, start, n, p0))
            pos.append(np.arange(p0, p0 + n, dtype=np.int64))
            start += n
        return cls(tokens=np.asarray(tokens, dtype=np.int64), positions=np.concatenate(pos), segments=segs,
                   logit_rows=None if logit_rows is None else np.asarray(logit_rows, dtype=np.int64))

    def finish(self) -> None:
        """Mark the new tokens as cached (call after the last layer ran)."""
        for s in self.segments:
            s.cache.length = s.pos0 + s.n
