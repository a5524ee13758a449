"""Client requests turned into scheduler Requests, and the status / model_info answers."""
from __future__ import annotations

import os
import time

from dsd.daemon import protocol as P


def build_request(d, ident: bytes, msg: dict):
    """(Request, None) or (None, error message) for a "generate" message."""
    from dsd.errors import DsdError
    from dsd.shard.sampling import SamplingParams
    from dsd.daemon.scheduler import Request

    rid = msg.get("id")
    if not isinstance(rid, str) or not rid:
        return None, "request id must be a non-empty string"
    try:
        params = SamplingParams.from_dict(msg.get("params") or {})
        if "messages" in msg and msg["messages"] is not None:
            # only the template's markers are special: "hi<|im_end|>" from a user stays text
            # tools: the OpenAI tool list, rendered by the template (daemon/reasoning.py parses
            # the calls the model writes back)
            tools = msg.get("tools")
            if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
                return None, "tools must be a list of tool objects"
            ids = d.template.encode(d.tokenizer, msg["messages"], add_generation_prompt=True,
                                    **({"tools": tools} if tools else {}))
        elif msg.get("prompt_ids") is not None:
            ids = [int(t) for t in msg["prompt_ids"]]
            if any(not 0 <= t < d.vocab for t in ids):
                return None, f"prompt_ids must be token ids in [0, {d.vocab})"
        elif isinstance(msg.get("prompt"), str):
            ids = d.tokenizer.encode(msg["prompt"])
        else:
            return None, "a generate request needs 'prompt' (text), 'messages' or 'prompt_ids'"
    except DsdError as e:
        return None, str(e)
    except (TypeError, ValueError) as e:
        return None, f"malformed request: {e}"
    if not ids:
        return None, "the prompt is empty"
    if len(ids) >= d.context:
        return None, (f"prompt has {len(ids)} tokens but the context holds {d.context}; "
                      f"shorten it (or start the daemon with a larger `context`)")
    # keep_special: the detokenizer keeps special tokens' text (reasoning/tool-call markers)
    return Request(rid, ident, ids, params, bool(msg.get("stream")),
                   keep_special=bool(msg.get("keep_special"))), None


def _rate(s: dict) -> float | None:
    b = s.get("busy_s") or 0
    return s.get("tokens", 0) / b if b > 0 else None


def status(d) -> dict:
    from dsd.daemon.config import log_path

    workers = []
    for h in d.handles if hasattr(d, "handles") else []:
        s = h.stats or {}
        workers.append({
            "index": h.index, "pid": h.pid, "state": h.state, "node": h.vnode.node,
            "cpus": list(h.vnode.cpus), "threads": h.threads, "progress": list(h.progress), "phase": h.phase,
            "node_cpus": list(h.vnode.node_cpus) if h.vnode.shared > 1 and not d.own_cpus() else None,
            "stage_threads": s.get("stage_threads", h.threads),
            "channel_pages": h.channel.page_kind if getattr(h, "channel", None) else None,
            "weight_bytes": s.get("weight_bytes"), "placement": s.get("placement"),
            "page_kinds": s.get("page_kinds"), "kv_bytes": s.get("kv_bytes", 0),
            "sequences": s.get("sequences", 0), "tokens": s.get("tokens", 0),
            "busy_tok_s": _rate(s), **h.policy.report(), "error": h.error,
            "spin_hits": s.get("spin_hits"), "blocking_waits": s.get("blocking_waits"),
            "link_messages": s.get("link_messages")})
    sched = d.scheduler.stats() if hasattr(d, "scheduler") else {}
    queue = d.admission.stats() if hasattr(d, "admission") else {}
    if queue:   # requests admitted that have no token yet (the scheduler's inbox is only a hand-off)
        sched["queued"] = queue["waiting"]
    hops = sorted(d.driver.hop_ns[-2000:]) if hasattr(d, "driver") else []
    return {"type": "status", "v": P.VERSION, "state": d.state, "error": d.error, "pid": os.getpid(),
            "uptime_s": time.time() - d.t_start,
            "cpu_s": time.process_time(),   # the coordinator's CPU time, all threads
            "transport": getattr(d, "transport", None), "instance": d.cfg["instance"],
            "socket_dir": d.sock_dir, "log_file": log_path(d.cfg),
            "model": getattr(d, "model_path", None),
            "placement": d.plan.mode if hasattr(d, "plan") else None,
            "plan": d.plan.describe() if hasattr(d, "plan") else [],
            "numa_note": getattr(d, "numa_note", ""), "context": getattr(d, "context", None),
            "kv_budget": ({"tokens": d.kv_budget.tokens, "per_worker_bytes": d.kv_budget.per_worker,
                           "bytes_per_token": d.kv_budget.bytes_per_token} if hasattr(d, "kv_budget") else None),
            "workers": workers, "scheduler": sched, "queue": queue,
            "watchdog": d.watch.report() if hasattr(d, "watch") else {},
            "embed_hop_us_median": hops[len(hops) // 2] / 1000 if hops else None,
            "refused_frames": dict(getattr(d, "bad_frames", {}))}


def model_info(d) -> dict:
    g = d.gguf
    return {"type": "model_info", "path": d.model_path, "name": g.get("general.name") or
            os.path.basename(d.model_path), "architecture": g.architecture,
            "n_layers": d.plan.n_layers, "d_model": d.d_model, "vocab_size": d.vocab,
            "context": d.context, "n_experts": int(g.arch_get("expert_count", 0) or 0),
            "n_experts_used": int(g.arch_get("expert_used_count", 0) or 0),
            "placement": d.plan.mode, "nodes": d.plan.n_workers, "chat_format": chat_format(d)}


def chat_format(d) -> dict:
    """How the model writes reasoning and tool calls (daemon/reasoning.py), found once."""
    if getattr(d, "_chat_format", None) is None:
        from dsd.daemon.reasoning import describe_template
        d._chat_format = describe_template(d.template, d.gguf.architecture)
    return d._chat_format
