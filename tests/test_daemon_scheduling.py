"""Continuous batching: concurrent streams decode together, long prompts are prefilled in chunks
while other streams keep producing tokens, and over-long prompts get a clear error."""
from __future__ import annotations

import asyncio
import threading

import pytest

from dsd.client import AsyncClient, InvalidRequest
from tests.test_daemon_util import running_daemon
from tests.tiny_moe import write_tiny_mixtral


def ids(seed: int, n: int) -> list[int]:
    return [1] + [3 + (seed * 7 + 13 * i) % 90 for i in range(n - 1)]


def test_concurrent_streams_chunked_prefill_and_context(tmp_path):
    # a tiny Mixtral (fast on this 2-core machine); prompts as token ids
    path = write_tiny_mixtral(str(tmp_path / "m.gguf"), n_layers=2, E=8, k=2, F=64, ctx=256)
    with running_daemon(tmp_path, "--model", path, "--nodes", "2", "--prefill-chunk", "16",
                        "--context", "200", "--max-batch", "8") as run:
        c = run.client()
        single = c.generate(ids(99, 6), temperature=0, max_tokens=12)

        async def many():
            ac = run.client(AsyncClient)

            async def one(i):
                chunks = [ch async for ch in ac.generate(ids(i, 5), stream=True,
                                                         temperature=0, max_tokens=20, ignore_eos=True)]
                return chunks

            res = await asyncio.gather(*[one(i) for i in range(6)])
            alone = await ac.generate(ids(99, 6), temperature=0, max_tokens=12)
            return res, alone

        res, alone = asyncio.run(many())
        for chunks in res:
            assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 20
            assert sum(len(ch.token_ids) for ch in chunks) == 20
        assert alone.token_ids == single.token_ids
        st = c.status()["scheduler"]
        assert st["max_decode_batch"] >= 3, st   # the six streams were decoded together

        # a long prompt (~200 tokens, 13 chunks of 16) joins while a stream runs: the stream
        # keeps receiving tokens between the long prompt's chunks
        counts = {"a": 0, "a_at_b_first": None}
        started = threading.Event()

        def stream_a():
            for ch in c.generate(ids(50, 4), stream=True, temperature=0, max_tokens=40,
                                 ignore_eos=True):
                counts["a"] += len(ch.token_ids)
                if counts["a"] >= 2:
                    started.set()

        ta = threading.Thread(target=stream_a)
        ta.start()
        assert started.wait(120)
        long_prompt = ids(7, 150)
        before = counts["a"]
        for ch in c.generate(long_prompt, stream=True, temperature=0, max_tokens=2):
            if counts["a_at_b_first"] is None:
                counts["a_at_b_first"] = counts["a"]
        ta.join(120)
        assert ch.prompt_tokens == 150
        chunks_needed = -(-ch.prompt_tokens // 16)
        assert counts["a_at_b_first"] - before >= chunks_needed - 2, (counts, before, chunks_needed)

        # context: prompt too long -> InvalidRequest naming the numbers; max_tokens capped
        with pytest.raises(InvalidRequest, match="context holds 200"):
            c.generate(ids(1, 230), max_tokens=4)
        r = c.generate(ids(2, 150), temperature=0, max_tokens=1000, ignore_eos=True)
        assert r.prompt_tokens + r.completion_tokens == 200 and r.finish_reason == "length"
        with pytest.raises(InvalidRequest, match="temperature"):
            c.generate([1, 2], temperature=-1)
        with pytest.raises(InvalidRequest, match="unknown sampling parameter"):
            c.generate([1, 2], tempreature=0.5)
        with pytest.raises(InvalidRequest, match="token ids"):
            c.generate([1, 100000])
