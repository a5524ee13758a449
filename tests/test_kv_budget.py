"""KV memory budget (daemon/kv_budget.py): bytes per token per worker for GQA and MLA in each
placement, the budget arithmetic, the context it allows, and admission through the daemon: a
request that would overflow the budget waits (cached prefixes are evicted first) and then runs."""
from __future__ import annotations

import threading
import time

import pytest
from gguf import GGMLQuantizationType as Q

from dsd.daemon.kv_budget import bytes_per_token, make_budget, parse_size
from dsd.daemon.placement import make_plan
from dsd.errors import DsdError
from dsd.shard.gguf_file import open_gguf
from tests.test_daemon_util import running_daemon
from tests.test_gguf_file import smollm2_path
from tests.tiny_moe import write_tiny_deepseek2


def test_parse_size():
    assert parse_size("auto") == 0 and parse_size(0) == 0
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(DsdError, match="kv_memory"):
        parse_size("lots")


def test_smollm2_bytes_per_token_and_budget():
    with open_gguf(smollm2_path()) as g:
        plan = make_plan(g, 2, "auto")   # layers: each worker keeps its own layers' K and V
        per = bytes_per_token(g, plan)
        # 30 layers x (K + V) x 3 KV heads x 64 x 4 bytes, split by the layer ranges
        assert sum(per) == 30 * 2 * 3 * 64 * 4
        layers = [plan.layer_owner.count(w) for w in range(2)]
        assert per == [n * 2 * 3 * 64 * 4 for n in layers]
        b = make_budget(g, plan, kv_memory=10 << 20)
        assert b.per_worker == [10 << 20] * 2 and b.tokens == min((10 << 20) // p for p in per)
        q8 = make_budget(g, plan, kv_memory=10 << 20, kv_type="q8_0")   # 34 bytes per 32 values
        assert q8.bytes_per_token == [p * 34 / 32 / 4 for p in per]
        auto = make_budget(g, plan, available=8 << 30)
        left = (8 << 30) - sum(plan.worker_bytes())
        assert auto.per_worker[0] == (left - max(1 << 30, int(0.1 * left))) // 2


def test_mla_latent_is_kept_by_every_worker_in_rows(tmp_path):
    path = write_tiny_deepseek2(str(tmp_path / "d.gguf"), n_layers=3, E=8, k=2, F=128, qtype=Q.Q8_0)
    with open_gguf(path) as g:
        row = (int(g.arch_get("attention.kv_lora_rank")) + int(g.arch_get("rope.dimension_count"))) * 4
        rows = make_plan(g, 2, "rows")
        assert bytes_per_token(g, rows) == [3 * row, 3 * row]          # the whole latent, twice
        experts = make_plan(g, 2, "experts")
        per = bytes_per_token(g, experts)                               # by layer owner
        assert sum(per) == 3 * row and per == [experts.layer_owner.count(w) * row for w in range(2)]


def test_requests_wait_for_kv_room(tmp_path):
    # 14 MiB per worker / 45 KiB per token (one worker: all 30 layers) = 318 tokens of KV
    with running_daemon(tmp_path, "--nodes", "1", "--kv-memory", "14M") as run:
        c = run.client(timeout=300)
        st = c.status()
        assert st["kv_budget"]["tokens"] == (14 << 20) // 46080 == 318 and st["context"] == 318
        kw = dict(temperature=0, max_tokens=190, ignore_eos=True)
        first = c.generate([1] + list(range(100, 110)), **kw)          # 11 + 190 positions
        assert first.completion_tokens == 190
        # its KV stays in the prefix cache; two more of that size need room: the second waits
        out = [None, None]

        def one(i):
            out[i] = run.client(timeout=300).generate([1] + list(range(200 + 20 * i, 210 + 20 * i)), **kw)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        saw_queue = False
        while any(t.is_alive() for t in ts):
            sch = c.status()["scheduler"]
            assert sch["kv_tokens_reserved"] <= 318
            saw_queue |= sch["active"] == 1 and sch["queued"] >= 1
            time.sleep(0.05)
        assert [o.completion_tokens for o in out] == [190, 190]
        assert saw_queue
