"""--deterministic, shared by generate, bench and start: batch-invariant kernels."""
from __future__ import annotations

import os

HELP = ("batch-invariant compute: a sequence's tokens do not depend on the other sequences in its "
        "batch or on how its prompt is chunked (slower prompts, see BENCHMARKS.md); "
        "same as DSD_DETERMINISTIC=1")


def add_deterministic_argument(p) -> None:
    p.add_argument("--deterministic", action="store_true", help=HELP)


def apply_deterministic(args) -> bool:
    """Turn the mode on for this process and every process it starts (the environment variable
    is what daemon workers read at import).  -> whether the mode is on."""
    if getattr(args, "deterministic", False):
        os.environ["DSD_DETERMINISTIC"] = "1"
        from dsd.shard.kernels import registry

        registry.BATCH_INVARIANT = True
    return os.environ.get("DSD_DETERMINISTIC", "") not in ("", "0")
