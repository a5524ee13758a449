"""dsd stop: stop the daemon and everything it started (workers, sockets, shared memory)."""
from __future__ import annotations

import signal
import sys

HELP = "stop the running daemon"


def add_arguments(p) -> None:
    p.add_argument("--instance", default=None)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before killing")


def stop(sock_dir: str, instance: str, timeout: float = 15.0) -> bool:
    """Stop the daemon of sock_dir; returns False if none was running.  Only the process that
    holds the instance's lock with the recorded start time and command line is signalled
    (instance_dir.running_daemon); after the timeout it is killed, then the workers daemon.json
    lists (each checked the same way).  Files of a crashed daemon are removed either way."""
    from dsd.daemon.instance_dir import (check_instance_dir, clean_stale, remove_pid_file,
                                         running_daemon, wait_gone, worker_identities)

    check_instance_dir(sock_dir)   # never act on files another user could have planted
    from dsd.daemon.instance_dir import legacy_daemon
    from dsd.errors import DsdError

    daemon = running_daemon(sock_dir)
    old = legacy_daemon(sock_dir) if daemon is None else None
    if old:
        raise DsdError(f"pid {old} looks like a daemon of an older dsd (its pid file has no identity "
                       f"and no lock), so dsd stop will not signal it: check `ps -p {old} -o args` "
                       f"and `kill {old}` yourself, then run `dsd stop` again to remove its files")
    if daemon is None:
        left = clean_stale(sock_dir, instance)
        remove_pid_file(sock_dir)
        if left:
            print(f"dsd stop: removed files of a daemon that did not stop cleanly: {', '.join(left)}",
                  file=sys.stderr)
        return False
    workers = worker_identities(sock_dir)
    daemon.signal(signal.SIGTERM)
    if not wait_gone(daemon, timeout):
        print(f"dsd stop: daemon pid {daemon.pid} did not exit in {timeout:.0f}s; killing it", file=sys.stderr)
        daemon.signal(signal.SIGKILL)
        wait_gone(daemon, 5)
    for w in workers:   # workers die with the coordinator (PDEATHSIG); make sure, if still ours
        if w.alive():
            w.signal(signal.SIGKILL)
    clean_stale(sock_dir, instance)
    remove_pid_file(sock_dir)
    return True


def run(args) -> int:
    from dsd.daemon import protocol as P
    from dsd.daemon.config import load_config

    cfg = load_config({"instance": args.instance})
    sock_dir = P.resolve_socket_dir(cfg["socket_dir"], cfg["instance"])
    if stop(sock_dir, cfg["instance"], args.timeout):
        print("dsd: daemon stopped", file=sys.stderr)
    else:
        print("dsd: no daemon was running", file=sys.stderr)
    return 0
