"""Prefix caching: finished sequences' KV stays in the workers, and a new request whose prompt
starts with the same tokens starts from a copy of it instead of prefilling them again.

The coordinator keeps, per cached sequence id, the token ids whose KV that sequence holds
(prompt + generated tokens that were fed back).  A new prompt takes the entry with the longest
common prefix m (at most len(prompt) - 1: the last prompt token must run to give logits); every
worker then copies the first m positions of that sequence's caches (the layers / heads it holds,
on its node) into the new sequence (`fork` in the step descriptor, shard/kv_cache.py
SequenceCache.fork), and the prompt is prefilled from position m.  Entries are evicted least
recently used beyond `max_tokens` cached positions; an evicted prefix is simply recomputed.
Entries a pending fork reads are pinned until that step has run.

Token ids, not text, are matched: a chat template that re-renders an earlier reply differently
from the tokens generated (dropped <think> blocks, another end-of-turn token) matches up to the
first difference.  With batch-invariant products (--deterministic) the answer with a cache hit
is bit-identical to a full prefill (the cached rows are what the prefill would compute).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = int(max_tokens)
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()   # seq -> token ids, LRU order
        self.pinned: dict[int, int] = {}
        self.tokens = 0
        self.lookups = self.hits = self.hit_tokens = self.prompt_tokens = 0

    def match(self, prompt: list[int]) -> tuple[int | None, int]:
        """(cached sequence, m): the longest common prefix of prompt with an entry, m <= len - 1.
        The entry is pinned (call unpin(seq) once its fork has run)."""
        self.lookups += 1
        self.prompt_tokens += len(prompt)
        if self.max_tokens <= 0 or len(prompt) < 2:
            return None, 0
        p = np.asarray(prompt, dtype=np.int64)
        best, best_m = None, 0
        for seq, toks in reversed(self.entries.items()):   # ties: the most recently used
            n = min(len(toks), len(p) - 1)
            if n <= best_m:
                continue
            diff = np.flatnonzero(toks[:n] != p[:n])
            m = int(diff[0]) if diff.size else n
            if m > best_m:
                best, best_m = seq, m
        if best is not None:
            self.entries.move_to_end(best)
            self.pinned[best] = self.pinned.get(best, 0) + 1
            self.hits += 1
            self.hit_tokens += best_m
        return best, best_m

    def unpin(self, seq: int) -> None:
        k = self.pinned.get(seq, 0) - 1
        if k > 0:
            self.pinned[seq] = k
        else:
            self.pinned.pop(seq, None)

    def insert(self, seq: int, tokens: list[int]) -> list[int]:
        """Keep seq's KV (its first len(tokens) positions); returns the sequence ids evicted (to
        free in the workers), seq itself when caching is off or it alone exceeds the budget."""
        if self.max_tokens <= 0 or not tokens or len(tokens) > self.max_tokens:
            return [seq]
        self.entries[seq] = np.asarray(tokens, dtype=np.int64)
        self.tokens += len(tokens)
        evicted = []
        for s in list(self.entries):
            if self.tokens <= self.max_tokens:
                break
            if s == seq or s in self.pinned:
                continue
            self.tokens -= len(self.entries.pop(s))
            evicted.append(s)
        return evicted

    def evict_to(self, limit: int) -> list[int]:
        """Evict least recently used unpinned entries until at most `limit` positions are kept."""
        out = []
        for s in list(self.entries):
            if self.tokens <= max(0, limit):
                break
            if s not in self.pinned:
                self.tokens -= len(self.entries.pop(s))
                out.append(s)
        return out

    def clear(self) -> list[int]:
        """Forget everything (a worker restarted with empty caches); returns the ids to free."""
        out = list(self.entries)
        self.entries.clear()
        self.pinned.clear()
        self.tokens = 0
        return out

    def stats(self) -> dict:
        return {"entries": len(self.entries), "tokens": self.tokens, "max_tokens": self.max_tokens,
                "lookups": self.lookups, "hits": self.hits, "hit_tokens": self.hit_tokens,
                "prompt_tokens": self.prompt_tokens,
                "hit_rate": round(self.hit_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None}
