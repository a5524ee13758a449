"""Prefix cache: time to first token of each turn of a scripted chat, with and without the cache.

A 10-turn conversation through the model's own chat template (SmolLM2's by default): each turn
sends the whole history plus a new user message of about the same length and takes up to
--reply-tokens greedy tokens, so the history grows by ~200 tokens a turn (~2,000 by turn 10).
Without the cache every turn prefills the whole history; with it, only what is new.  Also
printed: per turn, the prompt tokens the cache supplied (the hit rate under the real template).
From turn 2 on every turn has about the same number of new tokens (the last reply and a new
question), so turn N's TTFT over turn 2's is the cost of the history: ~1 with the cache.

    python bench/prefix_cache_bench.py [--model X.gguf] [--turns 10] [--nodes 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_bench import dsd  # noqa: E402

QUESTIONS = [
    "Tell me about the history of the bicycle, from the first designs to modern road bikes.",
    "What were the main safety problems of the penny-farthing, and how were they solved?",
    "How do gears on a bicycle work, and why do racing bikes have so many of them?",
    "Explain how a derailleur moves the chain between sprockets without stopping.",
    "What materials are bicycle frames made of today, and what are their trade-offs?",
    "Why are carbon fibre frames so light, and how are they manufactured?",
    "How do disc brakes compare with rim brakes in the rain and on long descents?",
    "What changed in bicycle tyres since pneumatic tyres were introduced?",
    "How should a beginner choose the right frame size and saddle height?",
    "Summarise everything we discussed in a few sentences for a short article.",
]


def run(cache_tokens: int, args, tmp) -> list[dict]:
    from dsd.client import Client

    inst = "pcb" + uuid.uuid4().hex[:6]
    sock = os.path.join(tmp, inst)
    env = dict(os.environ, DSD_SOCKET_DIR=sock, DSD_INSTANCE=inst, DSD_LOG_FILE=os.path.join(tmp, inst + ".log"),
               DSD_PREFIX_CACHE_TOKENS=str(cache_tokens))
    model = ["--model", args.model] if args.model else []
    dsd(["start", *model, "--nodes", str(args.nodes), "--context", "4096"], env)
    out = []
    try:
        c = Client(socket_dir=sock, timeout=600)
        c.generate("Hi", temperature=0, max_tokens=2)   # warm-up (its prefix shares nothing)
        msgs = [{"role": "system", "content": "You are a helpful assistant who answers in detail."}]
        for turn in range(args.turns):
            msgs.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            t0 = time.perf_counter()
            ttft, text, last = None, [], None
            for ch in c.chat(msgs, stream=True, temperature=0, max_tokens=args.reply_tokens, ignore_eos=True):
                if ttft is None and (ch.token_ids or ch.text):
                    ttft = time.perf_counter() - t0
                text.append(ch.text)
                last = ch
            msgs.append({"role": "assistant", "content": "".join(text)})
            out.append({"turn": turn + 1, "prompt_tokens": last.prompt_tokens,
                        "cached_tokens": last.cached_tokens, "ttft_ms": round(ttft * 1e3, 1)})
    finally:
        dsd(["stop"], env)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reply-tokens", type=int, default=160)
    ap.add_argument("--nodes", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsd-pcb-") as tmp:
        on = run(16384, args, tmp)
        off = run(0, args, tmp)
    print("turn  prompt  cached  TTFT cache on (ms)  TTFT cache off (ms)")
    for a, b in zip(on, off):
        print(f"{a['turn']:4d}  {a['prompt_tokens']:6d}  {a['cached_tokens']:6d}  {a['ttft_ms']:18.1f}  {b['ttft_ms']:19.1f}")
    print(json.dumps({"on": on, "off": off,
                      "last_over_turn2_on": round(on[-1]["ttft_ms"] / on[1]["ttft_ms"], 2),
                      "last_over_turn2_off": round(off[-1]["ttft_ms"] / off[1]["ttft_ms"], 2),
                      "hit_rate_on": round(sum(a["cached_tokens"] for a in on) / sum(a["prompt_tokens"] for a in on), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
