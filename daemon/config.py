"""Daemon configuration: conf/default.toml, then DSD_<KEY> environment variables, then flags.

Keys are unique across sections, so `Config.get("nodes")` and env `DSD_NODES` name one setting.
"""
from __future__ import annotations

import os
import tomllib
from importlib import resources

from dsd.errors import DsdError


def _defaults() -> dict:
    text = resources.files("dsd.conf").joinpath("default.toml").read_text()
    return tomllib.loads(text)


def _coerce(key: str, default, raw: str):
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise DsdError(f"environment variable DSD_{key.upper()}={raw!r} is not a valid "
                       f"{type(default).__name__}; fix or unset it") from None
    return raw


def load_config(overrides: dict | None = None, env: dict | None = None) -> dict:
    """Flat dict of every setting: defaults < environment < overrides (None values ignored)."""
    env = os.environ if env is None else env
    flat: dict = {}
    for section in _defaults().values():
        flat.update(section)
    for key, default in list(flat.items()):
        raw = env.get(f"DSD_{key.upper()}")
        if raw is not None:
            flat[key] = _coerce(key, default, raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            flat[key] = value
    check(flat)
    return flat


def check(c: dict) -> None:
    if c["placement"] not in ("experts", "rows", "auto"):
        raise DsdError(f"placement {c['placement']!r} is unknown; use experts, rows or auto")
    if c["pages"] not in ("auto", "1g", "2m", "thp", "4k"):
        raise DsdError(f"pages {c['pages']!r} is unknown; use auto, 1g, 2m, thp or 4k")
    if c.get("kv_type", "f32") not in ("f32", "f16", "bf16", "q8_0"):
        raise DsdError(f"kv_type {c['kv_type']!r} is unknown; use f32, f16, bf16 or q8_0")
    if int(c["nodes"]) < 0:
        raise DsdError(f"nodes must be >= 1 (or 0 = one worker per NUMA node with CPUs), got {c['nodes']}")
    for k in ("max_batch", "prefill_chunk"):
        if int(c[k]) < 1:
            raise DsdError(f"{k} must be >= 1, got {c[k]}")
    for k in ("max_queue", "restart_max", "spin_us", "prefix_cache_tokens", "context"):
        if int(c.get(k, 0)) < 0:
            raise DsdError(f"{k} must be >= 0, got {c[k]}")
    for k in ("restart_window_s", "restart_healthy_s", "stall_timeout_s", "stall_kill_s", "request_timeout"):
        if float(c.get(k, 0)) < 0:
            raise DsdError(f"{k} must be >= 0 seconds, got {c[k]} (0 turns it off where that applies)")


def worker_count(c: dict, topo=None) -> int:
    """Workers to start: `nodes`, or for 0 (the default) one per NUMA node that has CPUs, so a
    two-socket user who names nothing gets both sockets sharded (memory-only nodes, e.g. CXL
    expanders, run no worker)."""
    n = int(c["nodes"])
    if n > 0:
        return n
    if topo is None:
        from dsd.numa import read_topology

        topo = read_topology()
    return max(1, sum(1 for nd in topo.nodes if nd.cpus))


def state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "dsd")


def log_path(c: dict) -> str:
    return c["log_file"] or os.path.join(state_dir(), f"{c['instance']}.log")
