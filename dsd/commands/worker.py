"""dsd worker: one daemon worker process (started by the coordinator, not by hand)."""
from __future__ import annotations

HELP = "internal: a daemon worker process (started by `dsd start`)"
HIDDEN = True


def add_arguments(p) -> None:
    p.add_argument("--socket-dir", required=True)
    p.add_argument("--index", type=int, required=True)


def run(args) -> int:
    from dsd.daemon.worker import main

    return main(args.socket_dir, args.index)
