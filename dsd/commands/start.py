"""dsd start: launch the daemon (coordinator + one worker per NUMA node) and wait until ready."""
from __future__ import annotations

from dsd.commands._deterministic import add_deterministic_argument, apply_deterministic

import os
import sys
import time

HELP = "start the daemon: one worker per NUMA node, returns when it is ready"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None, help="GGUF file (default: conf / DSD_MODEL / SmolLM2)")
    p.add_argument("--nodes", "-N", type=int, default=None, help="workers, one per NUMA node")
    p.add_argument("--placement", choices=["experts", "rows", "auto"], default=None,
                   help="how MoE experts are split between workers (dense models: layer ranges)")
    p.add_argument("--pages", choices=["auto", "1g", "2m", "thp", "4k"], default=None,
                   help="page size backing the weights")
    p.add_argument("--threads-per-node", type=int, default=None)
    p.add_argument("--instance", default=None, help="daemon name (several can run side by side)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--context", type=int, default=None,
                   help="context length (default: the model's trained context, bounded by the KV budget)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV cache bytes per worker, e.g. 8G (default auto: available memory after the weights)")
    p.add_argument("--kv-type", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="KV cache element type (default f32; q8_0 = llama.cpp's --cache-type-k/v q8_0)")
    p.add_argument("--http", default=None, metavar="[HOST:]PORT",
                   help="also serve the OpenAI-compatible HTTP API")
    p.add_argument("--api-key", default=None,
                   help="refused: a key in a command line is visible to every local user (`ps`); "
                        "use DSD_API_KEY or --api-key-file")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the HTTP API's bearer key from this file (first line)")
    p.add_argument("--foreground", action="store_true", help="run in this process, log to stderr")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for ready")
    add_deterministic_argument(p)


def config_from_args(args) -> dict:
    from dsd.daemon.config import load_config

    over = {"model": args.model, "nodes": args.nodes, "placement": args.placement,
            "pages": args.pages, "threads_per_node": args.threads_per_node,
            "instance": args.instance, "max_batch": args.max_batch,
            "prefill_chunk": args.prefill_chunk, "context": args.context, "kv_memory": args.kv_memory,
            "kv_type": getattr(args, "kv_type", None), "ready_timeout": args.timeout}
    cfg = load_config(over)
    cfg["http"] = args.http
    cfg["api_key"] = args.api_key or _key_from_file(getattr(args, "api_key_file", None)) or \
        os.environ.get("DSD_API_KEY") or None
    return cfg


def _key_from_file(path: str | None) -> str | None:
    from dsd.errors import DsdError

    if not path:
        return None
    try:
        with open(path) as f:
            key = f.readline().strip()
    except OSError as e:
        raise DsdError(f"--api-key-file {path}: {e.strerror}; give a readable file holding the key") from None
    if not key:
        raise DsdError(f"--api-key-file {path} is empty; put the key on its first line")
    return key


def _doing(w: dict) -> str:
    """'allocating' while pages are pre-faulted, 'loading' while the file is read, else the state."""
    if w["state"] == "loading" and w.get("phase"):
        return w["phase"]
    return w["state"]


def _bar(done: int, total: int, width: int = 30) -> str:
    f = done / total if total else 0.0
    n = int(f * width)
    return "[" + "#" * n + "-" * (width - n) + f"] {f:4.0%} {done / 2**20:8.1f}/{total / 2**20:.1f} MiB"


def _failure_reason(log_file: str, since: int) -> str:
    try:
        with open(log_file, errors="replace") as f:
            f.seek(since)
            lines = f.read().splitlines()
    except OSError:
        return "see the log"
    for line in reversed(lines):
        if "start failed:" in line:
            return line.split("start failed:", 1)[1].strip()
    tail = [x for x in lines if x.strip()][-5:]
    return "; ".join(tail) if tail else "no output"


def _preflight(cfg) -> None:
    """The model file against its metadata and its plan against free memory, in this process:
    the error is one line with rc 1 before a daemon or any worker is started (the coordinator
    checks the same again for --foreground)."""
    from dsd.daemon.config import worker_count
    from dsd.shard.gguf_check import preflight
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.model_path import resolve_model

    with open_gguf(resolve_model(cfg["model"] or None)) as g:
        _, warnings = preflight(g, worker_count(cfg), cfg["placement"], cfg.get("pages"))
    for w in warnings:
        print(f"dsd: warning: {w}", file=sys.stderr)


def run(args) -> int:
    import subprocess

    apply_deterministic(args)  # the daemon and its workers inherit DSD_DETERMINISTIC

    from dsd.client import Client, DaemonNotRunning
    from dsd.daemon import protocol as P
    from dsd.daemon.config import log_path
    from dsd.errors import DsdError

    cfg = config_from_args(args)
    if args.api_key:   # refused, not warned: the key would be in `ps` for every local user
        raise DsdError("--api-key puts the key in this command line, which every local user sees "
                       "(`ps`); give it as DSD_API_KEY=KEY dsd start ... or --api-key-file PATH")
    if cfg["http"] is not None:   # a malformed --http fails here, before anything starts
        from dsd.daemon.http_serve import parse_http_address

        parse_http_address(cfg["http"])
    sock_dir = P.resolve_socket_dir(cfg["socket_dir"], cfg["instance"])
    from dsd.daemon.instance_dir import make_instance_dir, running_daemon

    make_instance_dir(sock_dir)        # refuses a directory another user could replace
    from dsd.daemon.instance_dir import legacy_daemon

    old = legacy_daemon(sock_dir)
    if old:
        raise DsdError(f"pid {old} looks like a daemon of an older dsd for instance {cfg['instance']!r}; "
                       f"stop it (`kill {old}` after checking `ps -p {old} -o args`) before starting")
    other = running_daemon(sock_dir)   # the lock holder with its recorded identity, not any pid
    if other:
        raise DsdError(f"a dsd daemon (pid {other.pid}) is already running for instance "
                       f"{cfg['instance']!r}; stop it with `dsd stop` first")
    if args.foreground:
        from dsd.daemon.coordinator import run_daemon

        return run_daemon(cfg)
    _preflight(cfg)   # a damaged/unsupported file or one that cannot fit fails here, rc 1
    log_file = log_path(cfg)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    since = os.fstat(log_fd).st_size
    argv = [sys.executable, "-m", "dsd.cli", "start", "--foreground"]
    for flag, val in (("--model", args.model), ("--nodes", args.nodes),
                      ("--placement", args.placement), ("--pages", args.pages),
                      ("--threads-per-node", args.threads_per_node), ("--instance", args.instance),
                      ("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk),
                      ("--context", args.context), ("--kv-memory", args.kv_memory), ("--http", args.http),
                      ("--kv-type", getattr(args, "kv_type", None)), ("--timeout", args.timeout)):
        if val is not None:
            argv += [flag, str(val)]
    env = dict(os.environ)
    env.pop("DSD_API_KEY", None)
    if cfg["api_key"]:   # through the environment: never in a command line (`ps` shows those)
        env["DSD_API_KEY"] = cfg["api_key"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                            start_new_session=True, close_fds=True, env=env)
    os.close(log_fd)
    print(f"dsd: starting daemon pid {proc.pid}; log: {log_file}", file=sys.stderr)
    client = Client(socket_dir=sock_dir, timeout=5)
    tty = sys.stderr.isatty()
    shown = 0
    note_shown = False
    t_end = time.monotonic() + float(cfg["ready_timeout"]) + 60
    last_pct: dict = {}
    while True:
        if proc.poll() is not None:
            raise DsdError(f"the daemon did not start: {_failure_reason(log_file, since)} "
                           f"(log: {log_file})")
        if time.monotonic() > t_end:
            proc.terminate()
            raise DsdError(f"the daemon was not ready in time; see {log_file}")
        try:
            st = client.status()
        except DaemonNotRunning:
            time.sleep(0.2)
            continue
        if st.get("numa_note") and not note_shown:
            print(f"dsd: {st['numa_note']}", file=sys.stderr)
            note_shown = True
        ws = st.get("workers", [])
        lines = [f"  node {w['node']} worker {w['index']} {_bar(*w['progress'])} {_doing(w)}"
                 for w in ws]
        if tty:
            if shown:
                sys.stderr.write(f"\x1b[{shown}F")
            sys.stderr.write("".join(line + "\x1b[K\n" for line in lines))
            sys.stderr.flush()
            shown = len(lines)
        else:
            for w in ws:  # quarter steps only, so logs stay short
                done, total = w["progress"]
                q = int(4 * done / total) if total else 0
                if last_pct.get(w["index"]) != (q, w.get("phase")):
                    last_pct[w["index"]] = (q, w.get("phase"))
                    print(f"  node {w['node']} worker {w['index']} {_bar(done, total)} {_doing(w)}",
                          file=sys.stderr)
        if st.get("state") == "ready":
            break
        if st.get("state") == "failed":
            proc.wait(timeout=30)
            raise DsdError(f"the daemon did not start: {st.get('error')} (log: {log_file})")
        time.sleep(0.25)
    for line in st.get("plan", []):
        print(f"dsd: {line}", file=sys.stderr)
    for w in st.get("workers", []):  # say where a hugepage pool fell short (auto fallback)
        small = {k: v for k, v in (w.get("page_kinds") or {}).items() if k in ("thp", "4k")}
        if small and cfg["pages"] == "auto":
            print(f"dsd: worker {w['index']} on node {w['node']}: {sum(small.values()) / 2**20:.1f} MiB "
                  f"in {'/'.join(small)} pages (node {w['node']}'s hugepage pool is short; "
                  f"`dsd doctor --model PATH --nodes N --apply` reserves it)", file=sys.stderr)
    print(f"dsd: ready (pid {st['pid']}, {len(st['workers'])} worker(s), socket dir {sock_dir})",
          file=sys.stderr)
    return 0
