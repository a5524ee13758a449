"""dsd plan: what each node would hold (no loading)."""
from __future__ import annotations

HELP = "show the placement plan per node: layers, experts, bytes, pages needed, and why"


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--nodes", "-N", type=int, default=None)
    p.add_argument("--placement", choices=["experts", "rows", "auto"], default=None)
    p.add_argument("--json", action="store_true")
    # --predict: decode tok/s per placement from a performance model (daemon/predict.py)
    p.add_argument("--predict", action="store_true", help="predict decode tok/s of each placement")
    p.add_argument("--shape", default=None, help="with --predict: a known model shape instead of a "
                   "file (deepseek-r1-q4_k_m, deepseek-v2-lite-q4_k_m; bytes estimated)")
    p.add_argument("--machine-nodes", type=int, default=0, help="NUMA nodes (default: this machine's)")
    p.add_argument("--bandwidth", type=float, default=0.0, help="GB/s per node (default: measured now)")
    p.add_argument("--cores", type=int, default=0, help="cores per node (default: this machine's)")
    p.add_argument("--cross-bandwidth", type=float, default=0.0, help="GB/s between nodes (default: the node's "
                   "bandwidth on a one-node machine, a quarter of it otherwise)")
    p.add_argument("--hop-us", type=float, default=None, help="one message between two processes, us (10)")
    p.add_argument("--layer-us", type=float, default=None, help="Python/launch overhead per layer, us "
                   "(570 for an MoE model, 150 for a dense one)")
    p.add_argument("--core-gbs", type=float, default=None,
                   help="GB/s of weights one core's kernels get through from memory (14.7)")


def run(args) -> int:
    import json

    from dsd.daemon.config import load_config, worker_count
    from dsd.numa import hugepage_plan, read_topology
    from dsd.shard.gguf_check import preflight
    from dsd.shard.gguf_file import open_gguf
    from dsd.shard.model_path import resolve_model

    if getattr(args, "predict", False):
        return _predict(args)
    cfg = load_config({"model": args.model, "nodes": args.nodes, "placement": args.placement})
    path = resolve_model(cfg["model"] or None)
    with open_gguf(path) as g:
        # the file against its metadata and the plan against free memory, as `dsd start` does
        plan, mem_warnings = preflight(g, worker_count(cfg), cfg["placement"], cfg.get("pages"))
        from dsd.daemon.kv_budget import make_budget, parse_size

        kv = make_budget(g, plan, parse_size(cfg.get("kv_memory", "auto")), kv_type=cfg.get("kv_type", "f32"))
        trained = int(g.arch_get("context_length", 4096) or 4096)
    wb = plan.worker_bytes()
    needs, note = hugepage_plan(wb, read_topology())
    if args.json:
        d = plan.to_dict()
        d.pop("pieces")
        d["worker_bytes"] = wb
        d["describe"] = plan.describe()
        d["pages"] = [{"node": n.node, "bytes": n.nbytes, "pages_1g": n.pages_1g,
                       "pages_2m": n.pages_2m, "commands": n.commands()} for n in needs]
        d["numa_note"] = note
        d["memory_warnings"] = mem_warnings
        d["kv"] = {"bytes_per_token": kv.bytes_per_token, "budget_bytes": kv.per_worker, "tokens": kv.tokens,
                   "trained_context": trained}
        print(json.dumps(d, indent=2))
        return 0
    print(f"model: {path}")
    for line in plan.describe():
        print(line)
    if plan.cost:
        print(f"cost model (expert-equivalents read per token by the slowest worker): {plan.cost}")
    for n in needs:
        print(f"node {n.node}: {n.nbytes / 2**20:.1f} MiB -> {n.pages_1g} x 1 GiB + {n.pages_2m} x 2 MiB "
              f"pages (free now: {n.have_1g_free} x 1G, {n.have_2m_free} x 2M)")
        for c in n.commands():
            print(f"    to reserve: {c}")
    for line in kv.describe():
        print(line)
    print(f"  context: {min(trained, kv.tokens)} of the model's {trained} (one sequence); "
          f"{kv.tokens // max(1, trained)} sequence(s) of the full context at once"
          + (" -- in rows placement every worker keeps the whole latent cache, so the budget is per worker"
             if plan.mode == "rows" and any(plan.split_attn(i) for i in range(plan.n_layers)) else ""))
    if note:
        print(f"note: {note}")
    for w in mem_warnings:
        print(f"warning: {w}")
    return 0


def _predict(args) -> int:
    from dsd.daemon.predict import ShapeModel, machine_from_args, report

    m = machine_from_args(args)
    n = args.nodes or (m.nodes if m.nodes > 1 else 2)
    if args.shape:
        lines = report(ShapeModel(args.shape), m, n)
    else:
        from dsd.shard.gguf_file import open_gguf
        from dsd.shard.model_path import resolve_model

        with open_gguf(resolve_model(args.model or None)) as g:
            lines = report(g, m, n)
    print("\n".join(lines))
    return 0
