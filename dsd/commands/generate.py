"""dsd generate: run a model in this process and stream the text to stdout."""
from __future__ import annotations

from dsd.commands._deterministic import add_deterministic_argument, apply_deterministic

import sys

from dsd.commands._sampling_args import add_sampling_arguments, sampling_kwargs

HELP = "generate text in one process (no daemon), streaming to stdout"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="raw text prompt (no chat template)")
    src.add_argument("--chat", "-c", help="a user message, formatted with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--mmap", action="store_true",
                   help="compute from the file's mapping (zero copy) instead of a huge-page copy of the weights")
    p.add_argument("--kv-type", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="KV cache element type (q8_0 = llama.cpp's --cache-type-k/v q8_0; shard/kv_cache.py)")
    p.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed to stderr")
    add_deterministic_argument(p)
    add_sampling_arguments(p)


def run(args) -> int:
    import time

    from dsd.shard.engine import Engine
    from dsd.shard.sampling import SamplingParams

    apply_deterministic(args)
    engine = Engine(args.model, threads=args.threads, weights="mmap" if args.mmap else "auto")
    engine.model.kv_type = getattr(args, "kv_type", None) or "f32"   # the caches new_cache makes
    params = SamplingParams(**sampling_kwargs(args))
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = engine.encode_chat(messages + [{"role": "user", "content": args.chat}])
    else:
        ids = engine.encode_prompt(args.prompt)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    finish = None
    for step in engine.generate(ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        finish = step.finish_reason
        if step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and t_first is not None:
        t1 = time.perf_counter()
        dec = (n - 1) / (t1 - t_first) if n > 1 else float("nan")
        print(f"[prompt {len(ids)} tok in {t_first - t0:.2f}s, generated {n} tok, "
              f"decode {dec:.1f} tok/s, finish={finish}]", file=sys.stderr)
    return 0
