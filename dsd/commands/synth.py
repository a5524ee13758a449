"""dsd synth: write a synthetic DeepSeek-shaped (or, --arch gpt-oss, gpt-oss-shaped) GGUF (random
quantized weights) for benchmarks."""
from __future__ import annotations

HELP = ("write a synthetic DeepSeek-V2-Lite- or gpt-oss-20b-shaped GGUF with random quantized weights "
        "(for benchmarks)")

# flag -> SynthSpec field (all integers unless listed in _FLOATS / _STRS)
_FLAGS = {
    "layers": "number of transformer layers (V2-Lite has 27; 12 gives ~4.6 GiB at Q4_K)",
    "hidden": "hidden size", "heads": "attention heads", "q_lora": "query LoRA rank (0 = plain attn_q)",
    "kv_lora": "KV latent rank", "qk_nope": "per-head non-rotary q/k dims", "qk_rope": "rotary dims",
    "v_head": "per-head value dims", "experts": "routed experts per layer", "experts_used": "experts per token",
    "shared": "shared experts", "expert_ffn": "expert intermediate size", "dense_ffn": "dense FFN size",
    "dense_lead": "leading dense layers", "seed": "random seed",
    "kv_heads": "key/value heads (gpt-oss)", "head_dim": "per-head q/k/v dims (gpt-oss)",
    "sliding_window": "sliding-window length of the even layers (gpt-oss)",
}
# flags of one architecture only: given with the other, they are an error (not silently unused)
_DEEPSEEK_ONLY = ("q_lora", "kv_lora", "qk_nope", "qk_rope", "v_head", "shared", "dense_ffn", "dense_lead")
_GPT_OSS_ONLY = ("kv_heads", "head_dim", "sliding_window")
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


def _defaults(arch: str):
    from dsd.shard.synth import SynthSpec, gpt_oss_spec

    return gpt_oss_spec() if arch == "gpt-oss" else SynthSpec()


def add_arguments(p) -> None:
    # numpy + gguf only; cheap.  Defaults are filled in by run() from the --arch's spec (argparse
    # keeps None), so an explicit flag can be told from a default
    d, g = _defaults("deepseek2"), _defaults("gpt-oss")

    def dflt(name):
        a, b = getattr(d, name), getattr(g, name)
        if name in _GPT_OSS_ONLY:
            return f"default {b}"
        if name in _DEEPSEEK_ONLY:
            return f"default {a}; deepseek2 only"
        return f"default {a}" + (f"; gpt-oss {b}" if a != b else "")

    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", default="deepseek2", choices=["deepseek2", "gpt-oss"],
                   help="architecture: deepseek2 (DeepSeek-V2-Lite's shapes) or gpt-oss (gpt-oss-20b's "
                        "widths, 4 layers, MXFP4 experts, Q8_0 elsewhere); default deepseek2")
    p.add_argument("--type", dest="qtype", default=None,
                   help="quant type of the weight matrices (default Q4_K, gpt-oss Q8_0; e.g. Q8_0, Q6_K, "
                        "IQ4_XS, IQ2_XXS, TQ1_0)")
    p.add_argument("--fallback-type", dest="fallback_qtype", default=None,
                   help=f"type for rows not a multiple of --type's block, e.g. 1408-wide (default {d.fallback_qtype})")
    for name, help_ in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                       help=f"{help_} ({dflt(name)})")
    for name, help_ in _ROLE_TYPES.items():
        extra = f" (gpt-oss: {getattr(g, name)})" if getattr(g, name) else ""
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="TYPE",
                       help=f"type of the {help_}{extra}")
    p.add_argument("--no-yarn", action="store_true", help="plain RoPE instead of the YaRN scaling "
                   "(V2-Lite's x40, gpt-oss's x32)")
    p.add_argument("--force", "-f", action="store_true", help="overwrite OUT if it exists")


def spec_from_args(args):
    """The SynthSpec `args` ask for: the --arch's defaults (SynthSpec() or gpt_oss_spec()) with
    every flag given on the command line applied; types checked and upper-cased."""
    from dsd.errors import DsdError
    from dsd.shard.synth import supported_types

    arch = getattr(args, "arch", "deepseek2") or "deepseek2"
    spec = _defaults(arch)
    wrong = _GPT_OSS_ONLY if arch != "gpt-oss" else _DEEPSEEK_ONLY
    for name in wrong:
        if getattr(args, name, None) is not None:
            raise DsdError(f"--{name.replace('_', '-')} does not apply to --arch {arch}")
    for name in _FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            setattr(spec, name, int(v))
    for flag in ("qtype", "fallback_qtype", *_ROLE_TYPES):
        val = getattr(args, flag, None)
        if val is None:
            continue  # the arch's default (a role's "" takes --type)
        val = val.upper()
        if flag in _ROLE_TYPES and not val:
            setattr(spec, flag, "")
            continue
        if val not in supported_types():
            raise DsdError(f"--{flag.replace('qtype', 'type').replace('_', '-')} {val} is not supported; "
                           f"choose one of {', '.join(supported_types())}")
        setattr(spec, flag, val)
    if getattr(args, "no_yarn", False):
        spec.yarn_factor, spec.context = 1.0, 4096
    if spec.layers < 1 or spec.dense_lead > spec.layers or spec.experts_used > spec.experts:
        raise DsdError("need --layers >= 1, --dense-lead <= --layers and --experts-used <= --experts")
    if arch == "gpt-oss" and (spec.heads % max(spec.kv_heads, 1) or spec.kv_heads < 1 or spec.head_dim % 2):
        raise DsdError("gpt-oss needs --kv-heads >= 1 dividing --heads and an even --head-dim")
    return spec


def run(args) -> int:
    import os
    import sys

    from dsd.errors import DsdError
    from dsd.shard.synth import write_synthetic

    if os.path.exists(args.out) and not args.force:
        raise DsdError(f"{args.out} exists; pass --force to overwrite it")
    spec = spec_from_args(args)

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
          f"{spec.arch}, {spec.layers} layers, {spec.qtype}"
          + (f" (experts {spec.expert_type})" if spec.expert_type else "") + f" in {res['seconds']:.1f} s")
    return 0
