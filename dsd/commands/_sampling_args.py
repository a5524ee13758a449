"""Sampling flags shared by `dsd generate` and `dsd chat`."""
from __future__ import annotations


def add_sampling_arguments(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=None,
                   help="0 = greedy (default: the sampler's default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--max-tokens", "-n", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", default=None)


def sampling_kwargs(args) -> dict:
    keys = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop",
            "max_tokens", "ignore_eos"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
