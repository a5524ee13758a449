"""A GGUF model checked against its own metadata before anything is built from it.

Why: the parser (gguf_file) only proves the file is well formed.  Whether its tensors are the ones
the architecture needs is a second question, and without this check the answers came late or not
at all: a norm of an integer type failed with a ZeroDivisionError traceback inside rms_norm, a
router ffn_gate_inp of the wrong width loaded and gave wrong logits with no error, block_count
one lower than the file's layers silently dropped a layer, a renamed output.weight silently fell
back to the tied embedding.  check_model() derives every tensor's expected shape from the
hyperparameters in the metadata, so any disagreement between the two (a damaged header, a
damaged tensor table, a mislabelled conversion) is one line naming the key or tensor, what was
expected, what was found and what to do.

What it cannot see: a changed *value* that is itself a valid model (a float hyperparameter such
as the norm epsilon or the RoPE base, expert_used_count within 1..n_expert, weight bytes).
Those make another model, not a broken one.

check_memory_fit() is the other early refusal (plan / doctor --model / start): see its docstring
for which memory figure it trusts.
"""
from __future__ import annotations

import math
import os

from dsd.errors import DsdError, GGUFError

# the type a 1-D tensor (norm weight, bias, rope_freqs) must have: llama.cpp's converters write
# them F32 whatever --outtype says and llama-quantize never touches them.  Only F32, not F16/BF16:
# a short vector's type byte damaged F32 -> F16 still fits the alignment padding (8 floats = 32
# bytes), so neither the layout nor the shape would notice, and the values would be garbage.
_VECTOR_TYPES = {0: "F32"}
MAX_LAYERS = 4096          # sanity bounds on hyperparameters (the largest models have ~128 layers)
MAX_HEADS = 65536
MIN_CONTEXT = 32           # a shorter context_length is no usable model, only a damaged field


class ModelFileError(GGUFError):
    """The file's tensors disagree with its metadata, or need something dsd does not run."""


class InsufficientMemoryError(DsdError):
    """The model's weights do not fit in the memory the nodes have free."""


def _fail(path: str, what: str, fix: str) -> ModelFileError:
    return ModelFileError(f"{path}: {what}; {fix}")


_REFIX = "the file is damaged or mislabelled: re-download or re-convert it"


class _Meta:
    """Typed metadata lookups that fail with a named one-line error instead of TypeError."""

    def __init__(self, g):
        self.g, self.path, self.arch = g, g.path, g.architecture

    def raw(self, key: str, default=None):
        return self.g.metadata.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default=None, *, lo: int = 0, hi: int | None = None) -> int:
        full = f"{self.arch}.{key}"
        v = self.g.metadata.get(full)
        if v is None:
            if default is None:
                raise _fail(self.path, f"metadata key {full!r} is missing", _REFIX)
            return default
        if isinstance(v, list) and v and all(x == v[0] for x in v):  # per-layer list, one value
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(self.path, f"metadata {full!r} is {v!r}, expected one integer", _REFIX)
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise _fail(self.path, f"metadata {full!r} is {v}, expected {rng}", _REFIX)
        return v

    def float(self, key: str, default: float, *, positive: bool = True) -> float:
        full = f"{self.arch}.{key}"
        v = self.g.metadata.get(full, default)
        # float32/float64 only, as llama.cpp's typed lookups: an integer type here means the
        # value's type byte was damaged (1e-5 read as int32 is 925353388)
        if full in self.g.metadata and self.g.metadata_types.get(full) not in (6, 12):
            raise _fail(self.path, f"metadata {full!r} has an integer/other value type, expected float32",
                        _REFIX)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (positive and v <= 0):
            want = "a finite number > 0" if positive else "a finite number"
            raise _fail(self.path, f"metadata {full!r} is {v!r}, expected {want}", _REFIX)
        return float(v)


class _Spec:
    """Expected tensors: name -> (shape in numpy order, kind 'vector'/'matrix')."""

    def __init__(self, g):
        self.g, self.path = g, g.path
        self.want: dict[str, tuple[tuple[int, ...], str]] = {}
        self.optional: set[str] = set()

    def need(self, name: str, *shape: int, optional: bool = False) -> None:
        self.want[name] = (tuple(shape), "vector" if len(shape) == 1 else "matrix")
        if optional:
            self.optional.add(name)

    def has(self, name: str) -> bool:
        return name in self.g.tensors

    def verify(self) -> None:
        from dsd.shard.gguf_file import ggml_type_name
        from dsd.shard.kernels import QUANT_TYPES

        tensors = self.g.tensors
        for name, (shape, kind) in self.want.items():
            t = tensors.get(name)
            if t is None:
                if name in self.optional:
                    continue
                raise _fail(self.path, f"tensor {name!r} is missing (the "
                            f"{self.g.architecture!r} architecture with this metadata needs it)", _REFIX)
            if t.shape != shape:
                raise _fail(self.path, f"tensor {name!r} has shape {list(t.shape)}, but the metadata "
                            f"implies {list(shape)}", _REFIX)
            if kind == "vector" and t.ggml_type not in _VECTOR_TYPES:
                raise _fail(self.path, f"tensor {name!r} has type {ggml_type_name(t.ggml_type)}, "
                            "expected F32 for a 1-D tensor (as llama.cpp's converters write them)", _REFIX)
            if t.ggml_type not in QUANT_TYPES:
                supported = ", ".join(q.name for q in QUANT_TYPES.values())
                raise _fail(self.path, f"tensor {name!r} has type {ggml_type_name(t.ggml_type)}, "
                            f"which dsd's kernels do not run (supported: {supported})",
                            "re-quantize the model to a supported type (e.g. llama-quantize ... Q4_K_M)")
        # A tensor nobody expects is a renamed or surplus one: ignoring it would silently change
        # the model (a renamed output.weight falls back to the tied embedding, blk.N past
        # block_count drops a layer).
        for name in tensors:
            if name not in self.want:
                raise _fail(self.path, f"tensor {name!r} is not part of a {self.g.architecture!r} "
                            "model with this metadata (block_count, expert_count, ...)", _REFIX)


# Every metadata key dsd reads.  A key one character away from one of these is a damaged name:
# the value would be silently replaced by a default (a renamed layer_norm_rms_epsilon turns
# 1e-6 into 1e-5).  Keys that are merely unknown (newer converters add keys) are accepted.
_ARCH_KEYS = """block_count context_length embedding_length feed_forward_length vocab_size
 attention.head_count attention.head_count_kv attention.key_length attention.value_length
 attention.key_length_mla attention.value_length_mla attention.layer_norm_rms_epsilon
 attention.q_lora_rank attention.kv_lora_rank rope.freq_base rope.dimension_count rope.scaling.type
 rope.scaling.factor rope.scaling.original_context_length rope.scaling.yarn_log_multiplier
 rope.scaling.yarn_beta_fast rope.scaling.yarn_beta_slow expert_count expert_used_count
 expert_shared_count expert_feed_forward_length leading_dense_block_count expert_gating_func
 expert_weights_norm expert_weights_scale expert_group_count expert_group_used_count
 nextn_predict_layers""".split()
_OTHER_KEYS = """general.architecture general.alignment general.name split.count split.no
 split.tensors.count tokenizer.chat_template tokenizer.ggml.model tokenizer.ggml.pre
 tokenizer.ggml.tokens tokenizer.ggml.token_type tokenizer.ggml.merges tokenizer.ggml.scores
 tokenizer.ggml.bos_token_id tokenizer.ggml.eos_token_id tokenizer.ggml.unknown_token_id
 tokenizer.ggml.padding_token_id tokenizer.ggml.eot_token_id tokenizer.ggml.eom_token_id
 tokenizer.ggml.fim_pad_token_id tokenizer.ggml.fim_rep_token_id tokenizer.ggml.fim_sep_token_id
 tokenizer.ggml.add_bos_token tokenizer.ggml.add_eos_token tokenizer.ggml.add_space_prefix""".split()


def _damaged_keys(g) -> None:
    known = set(_OTHER_KEYS) | {f"{g.architecture}.{k}" for k in _ARCH_KEYS}
    by_len: dict[int, list[str]] = {}
    for k in known:
        by_len.setdefault(len(k), []).append(k)
    for key in g.metadata:
        if key in known:
            continue
        for k in by_len.get(len(key), ()):
            if sum(a != b for a, b in zip(key, k)) == 1:
                raise _fail(g.path, f"metadata key {key!r} looks like a damaged {k!r} (one character "
                            "differs), whose value would silently fall back to a default", _REFIX)


def _layout(g) -> None:
    """Each part's tensors lie back to back in table order, each aligned: the only layout the
    GGUF writers (llama.cpp's gguf.cpp, gguf-py) produce.  Anything else means a damaged data
    offset, which otherwise reads another tensor's bytes (two offsets swapped: no overlap)."""
    prev: dict[str, int] = {}
    start: dict[str, int] = {}
    last_end: dict[str, int] = {}
    align = {p.path: p.alignment for p in g._parts}   # each part has its own general.alignment
    for t in g.tensors.values():
        if t.file not in prev:
            prev[t.file] = t.offset  # data section start = first tensor (relative offset 0)
            start[t.file] = t.offset
            rel_first = t.offset - _data_start(g, t.file)
            if rel_first != 0:
                raise _fail(g.path, f"tensor {t.name!r} is the first in its file but its data offset "
                            f"is {rel_first}, not 0", _REFIX)
        elif t.offset != prev[t.file]:
            raise _fail(g.path, f"tensor {t.name!r} has data offset {t.offset - start[t.file]}, but the "
                        f"previous tensor's data ends at {prev[t.file] - start[t.file]} (aligned)", _REFIX)
        al = align[t.file]
        prev[t.file] = t.offset + -(-t.nbytes // al) * al
        last_end[t.file] = t.offset + t.nbytes
    # ... and the last one ends the file (the writers pad it to the alignment or not at all): a
    # damaged type or dims of the last tensor has no next tensor to disagree with
    for p in g._parts:
        end = last_end.get(p.path)
        if end is not None and not end <= p.size <= -(-end // p.alignment) * p.alignment:
            raise _fail(g.path, f"{p.path}: the tensor table says the data ends at byte {end} but the file "
                        f"has {p.size} bytes", _REFIX)


def _data_start(g, file: str) -> int:
    for p in g._parts:
        if p.path == file:
            return p.data_start
    return 0


def _common(g, m: _Meta, s: _Spec) -> dict:
    n_layers = m.int("block_count", lo=1, hi=MAX_LAYERS)
    D = m.int("embedding_length", lo=1)
    emb = g.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise _fail(g.path, "tensor 'token_embd.weight' is missing or not 2-D", _REFIX)
    V = emb.shape[0]
    s.need("token_embd.weight", V, D)
    s.need("output_norm.weight", D)
    s.need("output.weight", V, D, optional=True)   # absent: tied to token_embd
    m.int("context_length", 4096, lo=MIN_CONTEXT)
    m.float("attention.layer_norm_rms_epsilon", 1e-5)
    m.float("rope.freq_base", 10000.0)
    for key in ("rope.scaling.factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast",
                "rope.scaling.yarn_beta_slow", "expert_weights_scale"):
        if m.raw(key) is not None:   # the value's type and finiteness; 0 is a valid value for some
            m.float(key, 0.0, positive=False)
    _tokenizer(g, V)
    return {"L": n_layers, "D": D, "V": V}


def _tokenizer(g, V: int) -> None:
    """Every id the tokenizer can produce must index the embedding."""
    toks = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(toks, list) and len(toks) > V:
        raise _fail(g.path, f"the tokenizer has {len(toks)} tokens but token_embd.weight only {V} rows",
                    _REFIX)
    if isinstance(toks, list) and g.metadata.get("tokenizer.ggml.model") == "gpt2":
        # byte-level BPE token texts are UTF-8 by construction; invalid bytes (kept by the parser
        # as surrogate escapes) fail inside the tokenizers library with a TypeError
        for i, t in enumerate(toks):
            if isinstance(t, str) and not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise _fail(g.path, f"token {i} of tokenizer.ggml.tokens is not valid UTF-8", _REFIX) from None
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom", "seperator"):
        full = f"tokenizer.ggml.{key}_token_id"
        v = g.metadata.get(full)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < V):
            raise _fail(g.path, f"metadata {full!r} is {v!r}, expected a token id in 0..{V - 1}", _REFIX)


def _heads(g, m: _Meta, D: int, key_default: bool, partial_rope: bool = False) -> tuple[int, int, int]:
    H = m.int("attention.head_count", lo=1, hi=MAX_HEADS)
    Hkv = m.int("attention.head_count_kv", H, lo=1, hi=H)
    if H % Hkv:
        raise _fail(g.path, f"attention.head_count {H} is not a multiple of head_count_kv {Hkv}", _REFIX)
    if key_default and D % H and m.raw("attention.key_length") is None:
        raise _fail(g.path, f"embedding_length {D} is not a multiple of attention.head_count {H} "
                    "and attention.key_length is absent", _REFIX)
    hd = m.int("attention.key_length", D // H if key_default else None, lo=1)
    hv = m.int("attention.value_length", hd, lo=1)
    if hv != hd:
        raise _fail(g.path, f"attention.value_length {hv} differs from key_length {hd}; dsd's "
                    f"{g.architecture} attention needs them equal", _REFIX)
    rope = m.int("rope.dimension_count", hd, lo=1)
    if partial_rope and (rope > hd or rope % 2):   # glm4moe: RoPE over the first dims of a head
        raise _fail(g.path, f"rope.dimension_count {rope} is odd or exceeds the head size {hd}", _REFIX)
    if rope != hd and not partial_rope:  # llama.cpp refuses the same ("invalid n_rot") for these architectures
        raise _fail(g.path, f"rope.dimension_count {rope} differs from the head size {hd}", _REFIX)
    return H, Hkv, hd


def _experts(g, m: _Meta, s: _Spec, p: str, D: int, F: int, E: int, shared: int = 0) -> None:
    s.need(p + "ffn_gate_inp.weight", E, D)       # the router: one row per expert, n_embd wide
    s.need(p + "ffn_gate_exps.weight", E, F, D)
    s.need(p + "ffn_up_exps.weight", E, F, D)
    s.need(p + "ffn_down_exps.weight", E, D, F)
    s.need(p + "exp_probs_b.bias", E, optional=True)
    if shared:
        s.need(p + "ffn_gate_shexp.weight", shared * F, D)
        s.need(p + "ffn_up_shexp.weight", shared * F, D)
        s.need(p + "ffn_down_shexp.weight", D, shared * F)


def _expert_counts(g, m: _Meta) -> tuple[int, int]:
    E = m.int("expert_count", 0, lo=0, hi=1 << 16)
    k = m.int("expert_used_count", 0, lo=0, hi=max(E, 0))
    if E and not k:
        raise _fail(g.path, f"expert_count is {E} but expert_used_count is 0 or missing", _REFIX)
    return E, k


def _dense(s: _Spec, p: str, D: int, F: int) -> None:
    s.need(p + "ffn_gate.weight", F, D)
    s.need(p + "ffn_up.weight", F, D)
    s.need(p + "ffn_down.weight", D, F)


def _gqa_block(s: _Spec, p: str, D: int, H: int, Hkv: int, hd: int, qk_norm: bool = False,
               bias: bool = False) -> None:
    """A llama-style block's norms and grouped-query attention (qwen3moe and qwen3 add per-head QK
    norms; qwen2 / qwen3 may have q/k/v biases, optional in llama.cpp)."""
    s.need(p + "attn_norm.weight", D)
    s.need(p + "ffn_norm.weight", D)
    s.need(p + "attn_q.weight", H * hd, D)
    s.need(p + "attn_k.weight", Hkv * hd, D)
    s.need(p + "attn_v.weight", Hkv * hd, D)
    if bias:
        s.need(p + "attn_q.bias", H * hd, optional=True)
        s.need(p + "attn_k.bias", Hkv * hd, optional=True)
        s.need(p + "attn_v.bias", Hkv * hd, optional=True)
    if qk_norm:
        s.need(p + "attn_q_norm.weight", hd)
        s.need(p + "attn_k_norm.weight", hd)
    s.need(p + "attn_output.weight", D, H * hd)


def _spec_llama(g, m: _Meta, s: _Spec) -> None:
    c = _common(g, m, s)
    D = c["D"]
    H, Hkv, hd = _heads(g, m, D, key_default=True)
    E, _ = _expert_counts(g, m)
    F = m.int("feed_forward_length", lo=1)
    Fe = m.int("expert_feed_forward_length", F, lo=1)
    s.need("rope_freqs.weight", hd // 2, optional=True)
    for i in range(c["L"]):
        p = f"blk.{i}."
        _gqa_block(s, p, D, H, Hkv, hd)
        if E and s.has(p + "ffn_gate_inp.weight"):   # Mixtral: experts in a llama body
            _experts(g, m, s, p, D, Fe, E)
        else:
            _dense(s, p, D, F)


def _spec_qwen3moe(g, m: _Meta, s: _Spec) -> None:
    c = _common(g, m, s)
    D = c["D"]
    H, Hkv, hd = _heads(g, m, D, key_default=True)
    E, _ = _expert_counts(g, m)
    if not E:
        raise _fail(g.path, "qwen3moe.expert_count is missing or 0; every qwen3moe layer is MoE", _REFIX)
    Fe = m.int("expert_feed_forward_length", lo=1)
    for i in range(c["L"]):
        p = f"blk.{i}."
        _gqa_block(s, p, D, H, Hkv, hd, qk_norm=True)
        _experts(g, m, s, p, D, Fe, E)


def _spec_qwen_dense(g, m: _Meta, s: _Spec) -> None:
    """qwen2 (q/k/v biases) and qwen3 (per-head QK norms): dense llama blocks."""
    c = _common(g, m, s)
    D = c["D"]
    H, Hkv, hd = _heads(g, m, D, key_default=True)
    F = m.int("feed_forward_length", lo=1)
    for i in range(c["L"]):
        p = f"blk.{i}."
        _gqa_block(s, p, D, H, Hkv, hd, qk_norm=g.architecture == "qwen3", bias=True)
        _dense(s, p, D, F)


def _spec_glm4moe(g, m: _Meta, s: _Spec) -> None:
    """GLM-4.5: qwen-style attention (biases, optional QK norms, partial RoPE), the pre-FFN norm
    named post_attention_norm, leading dense layers then sigmoid-routed experts + shared experts;
    the nextn_predict_layers MTP blocks after the trunk are not read (any tensors accepted)."""
    c = _common(g, m, s)
    D = c["D"]
    H, Hkv, hd = _heads(g, m, D, key_default=True, partial_rope=True)
    nextn = m.int("nextn_predict_layers", 0, lo=0, hi=c["L"] - 1)
    E, _ = _expert_counts(g, m)
    F = m.int("feed_forward_length", lo=1)
    Fe = m.int("expert_feed_forward_length", F, lo=1)
    lead = m.int("leading_dense_block_count", 0, lo=0)
    n_shared = m.int("expert_shared_count", 0, lo=0)
    L = c["L"] - nextn
    for i in range(L):
        p = f"blk.{i}."
        s.need(p + "attn_norm.weight", D)
        s.need(p + "post_attention_norm.weight", D)
        for n, rows in (("q", H * hd), ("k", Hkv * hd), ("v", Hkv * hd)):
            s.need(p + f"attn_{n}.weight", rows, D)
            s.need(p + f"attn_{n}.bias", rows, optional=True)
        s.need(p + "attn_q_norm.weight", hd, optional=True)
        s.need(p + "attn_k_norm.weight", hd, optional=True)
        s.need(p + "attn_output.weight", D, H * hd)
        if i < lead:
            _dense(s, p, D, F)
        else:
            if not E:
                raise _fail(g.path, f"layer {i} has experts but expert_count is missing or 0", _REFIX)
            _experts(g, m, s, p, D, Fe, E, n_shared)
    for name, t in g.tensors.items():   # MTP blocks: whatever the converter wrote, never used
        if name.startswith("blk.") and int(name.split(".")[1]) >= L:
            s.need(name, *t.shape, optional=True)


def _spec_deepseek2(g, m: _Meta, s: _Spec) -> None:
    from dsd.shard.moe import GATING_SIGMOID, GATING_SOFTMAX

    c = _common(g, m, s)
    D, L = c["D"], c["L"]
    H = m.int("attention.head_count", lo=1, hi=MAX_HEADS)
    rope = m.int("rope.dimension_count", 64, lo=2)
    if rope % 2:
        raise _fail(g.path, f"rope.dimension_count {rope} is odd; RoPE rotates pairs", _REFIX)
    dk = m.int("attention.key_length_mla", m.int("attention.key_length", 192, lo=1), lo=1)
    dv = m.int("attention.value_length_mla", m.int("attention.value_length", 128, lo=1), lo=1)
    if dk <= rope:
        raise _fail(g.path, f"the key head size {dk} must exceed rope.dimension_count {rope}", _REFIX)
    nope = dk - rope
    kvl = m.int("attention.kv_lora_rank", lo=1)
    ql = m.int("attention.q_lora_rank", 0, lo=0)
    E, k = _expert_counts(g, m)
    F = m.int("feed_forward_length", lo=1)
    Fe = m.int("expert_feed_forward_length", F, lo=1)
    n_shared = m.int("expert_shared_count", 0, lo=0, hi=1 << 10)
    lead = m.int("leading_dense_block_count", 0, lo=0, hi=L)
    gating = m.int("expert_gating_func", GATING_SOFTMAX, lo=0)
    if gating not in (0, GATING_SOFTMAX, GATING_SIGMOID):
        raise _fail(g.path, f"expert_gating_func {gating} is unknown (1 softmax, 2 sigmoid)",
                    "use a current llama.cpp conversion")
    groups = m.int("expert_group_count", 1, lo=1)
    if E and groups > 1:
        used = m.int("expert_group_used_count", groups, lo=1, hi=groups)
        if E % groups:
            raise _fail(g.path, f"expert_count {E} is not a multiple of expert_group_count {groups}", _REFIX)
        if k > used * (E // groups):
            raise _fail(g.path, f"expert_used_count {k} exceeds the {used * (E // groups)} experts of the "
                        f"{used} groups used", _REFIX)
    for i in range(L):
        p = f"blk.{i}."
        s.need(p + "attn_norm.weight", D)
        s.need(p + "ffn_norm.weight", D)
        if s.has(p + "attn_q.weight"):
            s.need(p + "attn_q.weight", H * dk, D)
        else:
            if not ql:
                raise _fail(g.path, f"tensor {p + 'attn_q.weight'!r} is missing and "
                            "attention.q_lora_rank is 0", _REFIX)
            s.need(p + "attn_q_a.weight", ql, D)
            s.need(p + "attn_q_a_norm.weight", ql)
            s.need(p + "attn_q_b.weight", H * dk, ql)
        s.need(p + "attn_kv_a_mqa.weight", kvl + rope, D)
        s.need(p + "attn_kv_a_norm.weight", kvl)
        if s.has(p + "attn_kv_b.weight"):
            s.need(p + "attn_kv_b.weight", H * (nope + dv), kvl)
        else:
            s.need(p + "attn_k_b.weight", H, kvl, nope)
            s.need(p + "attn_v_b.weight", H, dv, kvl)
        s.need(p + "attn_output.weight", D, H * dv)
        if i < lead or not s.has(p + "ffn_gate_inp.weight"):
            _dense(s, p, D, F)
        else:
            if not E:
                raise _fail(g.path, f"layer {i} has experts but expert_count is missing or 0", _REFIX)
            _experts(g, m, s, p, D, Fe, E, n_shared if s.has(p + "ffn_gate_shexp.weight") else 0)


_SPECS = {"llama": _spec_llama, "qwen3moe": _spec_qwen3moe, "deepseek2": _spec_deepseek2,
          "qwen2": _spec_qwen_dense, "qwen3": _spec_qwen_dense, "glm4moe": _spec_glm4moe}


def check_model(g) -> None:
    """Raise ModelFileError (or UnsupportedModelError for an architecture dsd does not run) unless
    every tensor of the opened GGUFModel `g` has the type and shape its metadata implies."""
    from dsd.errors import UnsupportedModelError
    from dsd.shard.models import ARCHITECTURES

    arch = g.architecture
    if arch not in ARCHITECTURES or arch not in _SPECS:
        raise UnsupportedModelError(f"{g.path}: architecture {arch!r} is not supported; dsd runs "
                                    f"{', '.join(sorted(ARCHITECTURES))} (convert a supported model)")
    _layout(g)
    _damaged_keys(g)
    m, s = _Meta(g), _Spec(g)
    _SPECS[arch](g, m, s)
    s.verify()


# -- memory ---------------------------------------------------------------------------------------

def _proc_meminfo_kb(root: str, key: str) -> int | None:
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory_fit(bytes_per_worker: list[int], topo=None, root: str = "/",
                     pages: str | None = None) -> list[str]:
    """Refuse (InsufficientMemoryError) when the workers' weight buffers cannot fit; -> warnings.

    Which figure is trusted: the system-wide MemAvailable of /proc/meminfo plus the free pages of
    every hugetlb pool (MemAvailable counts reserved huge pages as used, and the weights can live
    in them).  The per-node figures (sysfs node meminfo MemFree) are only warned about: on this VM
    node 0 once read 9.5 GB free while /proc/meminfo said 24.7 GB (FACTS.md; memory the guest
    kernel had not finished initialising, or a balloon; today both read 24.7 GB), so refusing on
    them would turn away models that load fine.  The system-wide figure cannot under-read that
    way: it is what the kernel will actually hand out.  On real two-socket hardware a node's own
    shortfall is still reported, as a warning naming the node.  --pages 1g/2m (strict pool
    sizes) is refused separately by the coordinator's strict-pool check."""
    from dsd.numa.alloc import human

    if topo is None:
        from dsd.numa import read_topology
        topo = read_topology()
    need = sum(bytes_per_worker)
    huge_free = sum(nd.pool(k).free_bytes for nd in topo.nodes for k in ("1g", "2m"))
    avail_kb = _proc_meminfo_kb(root, "MemAvailable")
    if avail_kb is None:
        avail_kb = _proc_meminfo_kb(root, "MemFree")
    warnings: list[str] = []
    if avail_kb is not None:
        # --pages thp/4k take ordinary memory: the reserved pools are of no use to them
        have = avail_kb * 1024 + (huge_free if pages not in ("4k", "thp") else 0)
        if need > have:
            raise InsufficientMemoryError(
                f"the model's weights need {human(need)} over {len(bytes_per_worker)} worker(s) but only "
                f"{human(have)} is available (/proc/meminfo MemAvailable + free hugepages); free memory, "
                "or use a smaller quantization")
    from dsd.numa.plan import hugepage_plan

    needs, _ = hugepage_plan(bytes_per_worker, topo)
    for x in needs:
        nd = topo.node(x.node)
        free = nd.mem_free + sum(nd.pool(k).free_bytes for k in ("1g", "2m"))
        if x.nbytes > free:
            warnings.append(f"node {x.node} would hold {human(x.nbytes)} but its meminfo shows {human(free)} "
                            "free (per-node figures under-read in VMs; the check trusts /proc/meminfo)")
    return warnings


def preflight(g, nodes: int, placement: str, pages: str | None = None, topo=None,
              root: str = "/") -> tuple[object, list[str]]:
    """What `dsd plan` / `dsd start` run before any worker loads: check_model(g), then the
    placement plan's buffers against free memory.  -> (plan, warnings)."""
    from dsd.daemon.placement import make_plan

    check_model(g)
    plan = make_plan(g, int(nodes), placement)
    return plan, check_memory_fit(plan.worker_bytes(), topo, root, pages)
