"""llama.cpp's own batched decode on the same GGUF file: the yardstick for "B streams vs one
stream".  One llama.cpp context with B sequences; each step decodes one token of every sequence
in one llama_decode call (what llama-server does with --parallel B), greedy.  Prints the step
time at batch 1 and batch B (medians of interleaved rounds) and the aggregate ratio.

    python bench/llama_batched.py /tmp/dsd-bench-synth-L4.gguf --batch 8 --threads 2 --rounds 3

Same measurement as `dsd bench --model F --batch B --llama-cpp` (which also runs dsd's side);
optional tool (needs llama-cpp-python), CI never runs it.
"""
from __future__ import annotations

import argparse
import sys

import dsd  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT, see dsd/__init__.py)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from dsd.shard.bench import bench_llama_cpp_batched

    r = bench_llama_cpp_batched(args.model, args.threads, args.batch, args.steps, args.rounds)
    print(f"llama.cpp {r['llama_cpp_version']}, {args.threads} threads: batch 1 {r['step_ms_1']:.1f} ms/step "
          f"({r['decode_tok_s_1']:.1f} tok/s), batch {r['batch']} {r['step_ms_batch']:.1f} ms/step "
          f"({r['aggregate_tok_s']:.1f} tok/s aggregate): {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
