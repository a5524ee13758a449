"""dsd synth: write a synthetic DeepSeek-shaped GGUF (random quantized weights) for benchmarks."""
from __future__ import annotations

HELP = "write a synthetic DeepSeek-V2-Lite-shaped GGUF with random quantized weights (for benchmarks)"

# flag -> SynthSpec field (all integers unless listed in _FLOATS / _STRS)
_FLAGS = {
    "layers": "number of transformer layers (V2-Lite has 27; 12 gives ~4.6 GiB at Q4_K)",
    "hidden": "hidden size", "heads": "attention heads", "q_lora": "query LoRA rank (0 = plain attn_q)",
    "kv_lora": "KV latent rank", "qk_nope": "per-head non-rotary q/k dims", "qk_rope": "rotary dims",
    "v_head": "per-head value dims", "experts": "routed experts per layer", "experts_used": "experts per token",
    "shared": "shared experts", "expert_ffn": "expert intermediate size", "dense_ffn": "dense FFN size",
    "dense_lead": "leading dense layers", "seed": "random seed",
}
# flag -> SynthSpec field: a type per tensor role (unsloth's dynamic quants keep attention,
# shared experts, embeddings and head above the routed experts' type); default: --type
_ROLE_TYPES = {
    "expert_type": "routed experts (ffn_{gate,up,down}_exps), e.g. IQ2_XXS, IQ1_S, TQ1_0, MXFP4",
    "expert_down_type": "routed experts' ffn_down_exps (default: --expert-type)",
    "attn_type": "attention projections (attn_q*, attn_kv_a_mqa, attn_k_b, attn_v_b, attn_output)",
    "shared_type": "shared experts (ffn_*_shexp)",
    "dense_type": "the leading dense layers' FFN",
    "embd_type": "token embeddings (token_embd)",
    "output_type": "the output head (output)",
}


def add_arguments(p) -> None:
    from dsd.shard.synth import SynthSpec  # numpy + gguf only; cheap

    d = SynthSpec()
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", default="deepseek2", choices=["deepseek2"], help="architecture (deepseek2)")
    p.add_argument("--type", dest="qtype", default=d.qtype,
                   help="quant type of the weight matrices (default Q4_K; e.g. Q8_0, Q6_K, IQ4_XS, IQ2_XXS, TQ1_0)")
    p.add_argument("--fallback-type", dest="fallback_qtype", default=d.fallback_qtype,
                   help="type for rows not a multiple of --type's block, e.g. 1408-wide (default Q8_0)")
    for name, help_ in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name),
                       help=f"{help_} (default {getattr(d, name)})")
    for name, help_ in _ROLE_TYPES.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default="", metavar="TYPE",
                       help=f"type of the {help_}")
    p.add_argument("--no-yarn", action="store_true", help="plain RoPE instead of V2-Lite's YaRN scaling")
    p.add_argument("--force", "-f", action="store_true", help="overwrite OUT if it exists")


def run(args) -> int:
    import os
    import sys

    from dsd.errors import DsdError
    from dsd.shard.synth import SynthSpec, supported_types, write_synthetic

    if os.path.exists(args.out) and not args.force:
        raise DsdError(f"{args.out} exists; pass --force to overwrite it")
    for flag in ("qtype", "fallback_qtype", *_ROLE_TYPES):
        val = getattr(args, flag).upper()
        if flag in _ROLE_TYPES and not val:
            continue  # the role takes --type
        if val not in supported_types():
            raise DsdError(f"--{flag.replace('qtype', 'type').replace('_', '-')} {val} is not supported; "
                           f"choose one of {', '.join(supported_types())}")
        setattr(args, flag, val)
    kw = {k: getattr(args, k) for k in _FLAGS}
    kw.update({k: getattr(args, k) for k in _ROLE_TYPES})
    spec = SynthSpec(qtype=args.qtype, fallback_qtype=args.fallback_qtype, **kw)
    if args.no_yarn:
        spec.yarn_factor, spec.context = 1.0, 4096
    if spec.layers < 1 or spec.dense_lead > spec.layers or spec.experts_used > spec.experts:
        raise DsdError("need --layers >= 1, --dense-lead <= --layers and --experts-used <= --experts")

    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\r{done / 2**30:6.2f} / {total / 2**30:.2f} GiB", end="", file=sys.stderr, flush=True)

    try:
        res = write_synthetic(args.out, spec, progress)
    except ValueError as e:
        raise DsdError(str(e)) from None
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"wrote {args.out}: {res['bytes'] / 2**30:.2f} GiB, {res['tensors']} tensors, "
          f"{spec.layers} layers, {spec.qtype} in {res['seconds']:.1f} s")
    return 0
