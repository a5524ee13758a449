"""Prefix caching (daemon/prefix_cache.py): the longest cached prefix is found, pinned while a
fork needs it, evicted least recently used; a forked KV cache holds exactly the prefix; and
through the daemon a chat's second turn prefills only its new tokens, with greedy tokens equal
to a full prefill (batch-invariant products), in the layers, experts and rows placements."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dsd.daemon.prefix_cache import PrefixCache
from dsd.shard.kv_cache import SequenceCache
from tests.test_daemon_util import running_daemon
from tests.test_gguf_file import smollm2_path
from tests.tiny_moe import write_tiny_deepseek2


def test_match_pin_and_lru_eviction():
    pc = PrefixCache(max_tokens=10)
    assert pc.insert(1, [5, 6, 7, 8]) == []
    assert pc.insert(2, [5, 6, 9]) == []
    assert pc.match([5, 6, 7, 8, 1]) == (1, 4)       # longest common prefix wins
    assert pc.match([5, 6, 7]) == (1, 2)             # at most len - 1; ties: most recently used
    assert pc.match([4, 6]) == (None, 0)
    pc.unpin(1)
    pc.unpin(1)                                      # (pinned once per match)
    # 4 + 3 + 4 = 11 > 10: the least recently used unpinned entry goes (2; 1 was just matched)
    assert pc.insert(3, [1, 2, 3, 4]) == [2]
    seq, m = pc.match([1, 2, 3, 0])                  # pins 3
    assert (seq, m) == (3, 3)
    assert pc.insert(4, [9] * 6) == [1]              # 3 is pinned, 1 goes
    pc.unpin(3)
    assert pc.insert(5, [0] * 11) == [5]             # alone over the budget: not kept
    st = pc.stats()
    assert st["hits"] == 3 and st["hit_tokens"] == 4 + 2 + 3 and st["lookups"] == 4
    assert sorted(pc.clear()) == [3, 4] and pc.tokens == 0
    assert PrefixCache(0).insert(7, [1, 2]) == [7]   # off


def test_fork_copies_the_prefix_only():
    rng = np.random.default_rng(0)
    c = SequenceCache(2, 64, initial=4)
    k, v, lat = rng.standard_normal((10, 3, 8)), rng.standard_normal((10, 3, 8)), rng.standard_normal((10, 5))
    c.append(0, 0, heads_first=True, k=k.astype(np.float32), v=v.astype(np.float32))
    c.append(1, 0, mla=lat.astype(np.float32))
    c.length = 10
    f = c.fork(6)
    assert f.length == 6 and f.heads_first == {"k", "v"}
    kv = f.append(0, 6, heads_first=True, k=np.zeros((1, 3, 8), np.float32), v=np.zeros((1, 3, 8), np.float32))
    assert np.array_equal(kv["k"][:, :6], k[:6].swapaxes(0, 1).astype(np.float32)) and not kv["k"][:, 6].any()
    assert np.array_equal(f.append(1, 6, mla=np.ones((1, 5), np.float32))["mla"][:6], lat[:6].astype(np.float32))
    assert np.array_equal(c.layers[0]["k"][:, 6:10], k[6:10].swapaxes(0, 1).astype(np.float32))  # source untouched


def _two_turns(c, first_user: str):
    kw = dict(temperature=0, max_tokens=12, ignore_eos=True)
    msgs = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": first_user}]
    r1 = c.chat(msgs, **kw)
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And then?"}]
    r2 = c.chat(msgs, **kw)
    return r1, r2


@pytest.mark.parametrize("model,placement", [("smollm2", "auto"), ("deepseek2", "experts"), ("deepseek2", "rows")])
def test_second_turn_reuses_the_first(tmp_path, monkeypatch, model, placement):
    if model == "smollm2":
        path = smollm2_path()
    else:
        path = write_tiny_deepseek2(str(tmp_path / "ds.gguf"), n_layers=3, E=16, k=4, F=128, D=64,
                                    qtype=Q.Q8_0, q_lora=32, seed=7)
    answers = {}
    for cache in ("16384", "0"):
        monkeypatch.setenv("DSD_PREFIX_CACHE_TOKENS", cache)   # the daemon's environment copies ours
        with running_daemon(tmp_path, "--model", path, "--nodes", "2", "--placement", placement,
                            "--deterministic") as run:
            c = run.client(timeout=300)
            r1, r2 = _two_turns(c, "Name a colour.")
            answers[cache] = (r1.token_ids, r2.token_ids)
            st = c.status()["scheduler"]["prefix_cache"]
            if cache == "0":
                assert r2.cached_tokens == 0 and st["hits"] == 0
            else:
                # turn 2 starts with turn 1's prompt (system + first question) at least
                assert r1.cached_tokens == 0 and r2.cached_tokens >= r1.prompt_tokens - 1, (r1, r2)
                assert r2.cached_tokens < r2.prompt_tokens
                assert st["hits"] == 1 and st["hit_tokens"] == r2.cached_tokens and st["entries"] >= 1
                # a third request with the same system prompt shares that much too
                r3 = c.chat([{"role": "system", "content": "You are a terse assistant."},
                             {"role": "user", "content": "Name a fruit."}], temperature=0, max_tokens=2)
                assert r3.cached_tokens > 5
    assert answers["16384"] == answers["0"]
