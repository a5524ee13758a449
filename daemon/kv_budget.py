"""KV memory: bytes per token each worker keeps, the per-node budget, and how many tokens fit.

Per token and layer a worker that computes the layer's attention keeps (shard/kv_cache.py):
  GQA (llama, qwen, glm, gpt-oss)  K and V: 2 x n_kv_heads x head_dim elements (heads-first)
  MLA (DeepSeek)                   the latent row: kv_lora_rank + rope dims elements
at the cache's element size (`kv_type`: f32 4 bytes, f16 / bf16 2, q8_0 34/32).  Which workers keep a layer: its owner, and
with its heads split (rows placement, MLA) every worker, since each holds the whole latent (it is
not per head) -- so in rows placement the budget binds per worker, not per model.

The budget (`kv_memory`, bytes per worker; 0 = automatic): the memory the kernel reports
available (/proc/meminfo MemAvailable, the figure shard/gguf_check.py trusts, plus free hugepages)
minus the weights still to load, minus a reserve of max(1 GiB, 10%), split between the workers.
The scheduler admits a request only while every admitted request's prompt + max_tokens, plus the
prefix cache's kept positions, fit in `tokens` (the tightest worker's budget / its bytes per
token); a request that can never fit is refused with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

RESERVE_MIN = 1 << 30
RESERVE_FRACTION = 0.10
ELEMENT_BYTES = 4   # float32 cache rows


def parse_size(spec) -> int:
    """'auto' or 0 -> 0 (automatic); '8G', '512M', '64K' or a number of bytes -> bytes."""
    from dsd.errors import DsdError

    s = str(spec).strip().upper().removesuffix("B").removesuffix("I")
    if s in ("", "AUTO", "0"):
        return 0
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    try:
        v = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        v = -1
    if v <= 0:
        raise DsdError(f"kv_memory {spec!r}: give bytes per worker like 8G, 512M or 'auto'")
    return int(v)


def layer_kv_elements(gguf_model, i: int) -> int:
    """Cached elements per token of layer i (see the module docstring)."""
    g = gguf_model
    kv_lora = int(g.arch_get("attention.kv_lora_rank", 0) or 0)
    if kv_lora:
        return kv_lora + int(g.arch_get("rope.dimension_count", 0) or 0)
    heads = int(g.arch_get("attention.head_count"))
    kv = g.arch_get("attention.head_count_kv", heads)
    kv = int(kv[i] if isinstance(kv, (list, tuple)) else kv or heads)
    d = int(g.arch_get("embedding_length"))
    k = int(g.arch_get("attention.key_length", 0) or d // heads)
    v = int(g.arch_get("attention.value_length", 0) or k)
    return kv * (k + v)


def bytes_per_token(gguf_model, plan, element_bytes: float = ELEMENT_BYTES) -> list[float]:
    """KV bytes per token of context that each worker keeps."""
    out = [0.0] * plan.n_workers
    for i in range(plan.n_layers):
        b = layer_kv_elements(gguf_model, i) * element_bytes
        if plan.split and plan.split_attn(i):
            for w in range(plan.n_workers):
                out[w] += b
        else:
            out[plan.layer_owner[i]] += b
    return out


@dataclass
class KVBudget:
    per_worker: list[int]        # bytes each worker may spend on KV
    bytes_per_token: list[float]
    tokens: int                  # positions of KV (all sequences together) that fit everywhere

    def describe(self) -> list[str]:
        from dsd.numa.alloc import human

        lines = [f"KV cache: {human(int(max(self.bytes_per_token)))} per token on the busiest worker; "
                 f"{self.tokens} tokens of context fit (all sequences together)"]
        for w, (b, n) in enumerate(zip(self.per_worker, self.bytes_per_token)):
            lines.append(f"  worker {w}: {human(int(n))}/token, budget {human(b)}"
                         + ("" if n else " (keeps no KV)"))
        return lines


def available_bytes(root: str = "/") -> int:
    """MemAvailable + free hugepages (what shard/gguf_check.py's memory check trusts)."""
    from dsd.numa import read_topology
    from dsd.shard.gguf_check import _proc_meminfo_kb

    kb = _proc_meminfo_kb(root, "MemAvailable") or _proc_meminfo_kb(root, "MemFree") or 0
    topo = read_topology()
    return kb * 1024 + sum(nd.pool(k).free_bytes for nd in topo.nodes for k in ("1g", "2m"))


def make_budget(gguf_model, plan, kv_memory: int = 0, available: int | None = None,
                loaded: bool = False, kv_type: str = "f32") -> KVBudget:
    """kv_memory > 0: that many bytes per worker; else the automatic budget (module docstring).
    loaded: the weights are already in memory (do not subtract them again)."""
    from dsd.shard.kv_cache import ELEMENT_BYTES

    per_tok = bytes_per_token(gguf_model, plan, ELEMENT_BYTES[kv_type])
    n = plan.n_workers
    if kv_memory > 0:
        per = [int(kv_memory)] * n
    else:
        have = available_bytes() if available is None else int(available)
        if not loaded:
            have -= sum(plan.worker_bytes())
        have -= max(RESERVE_MIN, int(RESERVE_FRACTION * have))
        per = [max(0, have // n)] * n
    fits = [int(b // t) for b, t in zip(per, per_tok) if t > 0]
    return KVBudget(per, per_tok, min(fits) if fits else 1 << 40)
