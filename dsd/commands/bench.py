"""dsd bench: prefill and decode speed, bytes read per token, and the memory roofline."""
from __future__ import annotations

from dsd.commands._deterministic import add_deterministic_argument, apply_deterministic

HELP = ("benchmark a model in one process (prefill, decode, bytes/token, roofline) beside the C "
        "yardsticks (llama.cpp's / ik_llama.cpp's llama-bench, --against)")

LLAMA_CPP_PYTHON = "llama-cpp-python (Python loop, understates llama.cpp by ~25%; cross-check only)"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--mmap", action="store_true",
                   help="compute from the file's mapping (zero copy) instead of a huge-page copy of the weights")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--against", action="append", default=[], metavar="LLAMA_BENCH",
                   help="a llama-bench binary (llama.cpp or ik_llama.cpp; repeatable) to run after dsd on the "
                        "same file, threads and token counts, decode at the prompt's depth; prints dsd/it ratios "
                        "(build them with bench/build_yardsticks.sh: ~/.cache/dsd-yardsticks/*/llama-bench)")
    p.add_argument("--repeat", "-r", type=int, default=3, metavar="R",
                   help="llama-bench repetitions per test for --against (its -r; default 3)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also run " + LLAMA_CPP_PYTHON.replace("%", "%%") + " on the same file and thread count")
    p.add_argument("--profile", action="store_true", help="split decode time into kernels vs the rest")
    p.add_argument("--batch", type=int, default=0, metavar="B",
                   help="also decode B sequences per step (continuous batching, one process): aggregate "
                        "tok/s and its ratio to one sequence (with --llama-cpp: llama.cpp's, same way)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_deterministic_argument(p)


def run(args) -> int:
    import json
    import sys

    from dsd.shard import bench, yardstick
    from dsd.shard.engine import Engine
    from dsd.shard.kernels import registry

    if args.prompt_tokens < 1 or args.decode_tokens < 1:
        print("dsd bench: --prompt-tokens and --decode-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.batch < 0 or args.batch == 1:
        print("dsd bench: --batch must be 2 or more (0 = skip)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("dsd bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    # check the yardsticks (exist, run, are llama-bench) before spending minutes on dsd's run
    yardsticks = [yardstick.Yardstick(path) for path in args.against]
    apply_deterministic(args)
    engine = Engine(args.model, threads=args.threads, weights="mmap" if args.mmap else "auto")
    res = bench.bench_engine(engine, args.prompt_tokens, args.decode_tokens)
    res["weight_pages"] = engine.weight_pages
    res["deterministic"] = registry.BATCH_INVARIANT
    res["read_gb_s"] = bench.measure_read_bandwidth()
    res["roofline_tok_s"] = res["read_gb_s"] * 1e9 / res["bytes_per_token"]
    res["roofline_fraction"] = res["decode_tok_s"] / res["roofline_tok_s"]
    if args.profile:
        res["decode_profile"] = bench.profile_decode(engine, min(64, args.decode_tokens), args.prompt_tokens)
    if args.batch:
        res["batched"] = bench.bench_batched(engine, args.batch)
    if args.llama_cpp:
        try:
            res["llama_cpp"] = bench.bench_llama_cpp(engine.path, engine.threads, args.prompt_tokens,
                                                     args.decode_tokens)
        except ImportError:
            print("llama-cpp-python is not installed (pip install llama-cpp-python); skipping it",
                  file=sys.stderr)
        else:
            lc = res["llama_cpp"]
            res["decode_vs_llama_cpp"] = res["decode_tok_s"] / lc["decode_tok_s"]
            res["prefill_vs_llama_cpp"] = res["prefill_tok_s"] / lc["prefill_tok_s"]
            lc["label"] = LLAMA_CPP_PYTHON
            if args.batch:
                res["llama_cpp_batched"] = bench.bench_llama_cpp_batched(engine.path, engine.threads, args.batch)
                res["llama_cpp_batched"]["label"] = LLAMA_CPP_PYTHON
    if yardsticks:
        path, threads = engine.path, engine.threads
        del engine  # free dsd's copy of the weights before llama-bench loads its own
        import gc
        gc.collect()
        architecture = yardstick.gguf_architecture(path)
        res["yardsticks"] = [
            yardstick.compare(res, y.run(path, threads, args.prompt_tokens, args.decode_tokens,
                                         depth=args.prompt_tokens, repeat=args.repeat, architecture=architecture),
                              res["read_gb_s"])
            for y in yardsticks]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"model           {res['model']}")
    print(f"threads         {res['threads']}")
    print(f"weights         {res['weight_pages']}")
    if res.get("deterministic"):
        print("mode            deterministic (batch-invariant kernels)")
    print(f"prefill         {res['prefill_tok_s']:8.1f} tok/s  ({res['prompt_tokens']}-token prompt, the second one; "
          f"first {res['prefill_first_tok_s']:.1f})")
    print(f"decode          {res['decode_tok_s']:8.1f} tok/s  ({res['decode_tokens']} tokens, "
          f"{res['decode_ms_per_token']:.2f} ms/token)")
    print(f"weights/token   {res['bytes_per_token'] / 1e6:8.1f} MB   -> {res['effective_gb_s']:.1f} GB/s effective")
    print(f"read bandwidth  {res['read_gb_s']:8.1f} GB/s (STREAM-like sum) -> roofline "
          f"{res['roofline_tok_s']:.0f} tok/s, decode at {100 * res['roofline_fraction']:.0f}%")
    if "decode_profile" in res:
        p = res["decode_profile"]
        print(f"decode profile  {p['ms_per_token']:.2f} ms/token at {p['context']} cached tokens = "
              f"{p['ms_in_weight_products']:.2f} ms weight products + {p['ms_in_attention']:.2f} ms "
              f"attention + {p['ms_in_norm_rope']:.2f} ms norms/RoPE + {p['ms_outside_kernels']:.2f} ms "
              f"outside numba kernels ({100 * p['outside_fraction']:.1f}%)")
        print(f"                {p['kernel_calls_per_token']:.0f} kernel calls and "
              f"{p['parallel_regions_per_token']:.0f} parallel regions per token; top: " +
              ", ".join(f"{k} {v['calls']:.0f}x {v['ms']:.2f} ms" for k, v in list(p['kernels'].items())[:4]))
    for y in res.get("yardsticks", ()):
        print(f"{y['name']}: {yardstick.describe(y)}")
        print(f"  dsd / {y['name']}: prefill {y['prefill_ratio']:.2f}x, decode {y['decode_ratio']:.2f}x "
              f"(its decode at {100 * y['roofline_fraction']:.0f}% of the roofline, with dsd's bytes/token)")
    if "llama_cpp" in res:
        lc = res["llama_cpp"]
        print(f"{LLAMA_CPP_PYTHON} {lc['llama_cpp_version']}:")
        print(f"  prefill {lc['prefill_tok_s']:.1f} tok/s (first {lc['prefill_first_tok_s']:.1f}), decode "
              f"{lc['decode_tok_s']:.1f} tok/s, same threads; dsd/it prefill {res['prefill_vs_llama_cpp']:.2f}x, "
              f"decode {res['decode_vs_llama_cpp']:.2f}x")
    for who, key in (("batched", "batched"), ("llama-cpp-python batch", "llama_cpp_batched")):
        if key in res:
            b = res[key]
            print(f"{who:15s} {b['batch']} sequences: {b['aggregate_tok_s']:.1f} tok/s aggregate "
                  f"({b['step_ms_batch']:.1f} ms/step) = {b['ratio']:.2f}x one sequence "
                  f"({b['step_ms_1']:.1f} ms/step)")
    return 0
