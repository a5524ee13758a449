"""dsd http-frontend: the daemon's HTTP API in a process of its own (started by the coordinator).

It serves the OpenAI-compatible API on the listening socket the coordinator bound (inherited as
--fd) and talks to the coordinator through ctl.sock like any client, so the HTTP server's Python
never shares a GIL with the scheduling loop (as vLLM's API server process).  The API key comes in
the environment (DSD_API_KEY), never on the command line.
"""
from __future__ import annotations

HELP = "internal: the daemon's HTTP API process (started by `dsd start --http`)"
HIDDEN = True


def add_arguments(p) -> None:
    p.add_argument("--socket-dir", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--log-level", default="warning")


def run(args) -> int:
    import os

    from dsd.daemon.http_serve import serve_socket

    key = os.environ.pop("DSD_API_KEY", None) or None
    serve_socket(args.fd, args.socket_dir, key, log_level=args.log_level)
    return 0
