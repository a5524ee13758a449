"""GLM-4.5 / GLM-4.5-Air (GGUF arch `glm4moe`).

Attention as Qwen (shard/models/qwen.py): q/k/v biases, optional per-head QK RMSNorm before RoPE,
head_dim = attention.key_length; RoPE is NeoX-style over only the first rope.dimension_count
dims of each head (partial rotary, half of head_dim in GLM-4.5), the rest pass through.

Block: h += attn(rms(h) * attn_norm);  h += ffn(rms(h) * post_attention_norm)   (GLM names the
pre-FFN norm post_attention_norm; it sits where llama's ffn_norm does).
FFN: the first leading_dense_block_count layers are dense SwiGLU; the others are DeepSeek-V3-style
MoE (dsd.shard.moe): sigmoid scores, top-k chosen on score + exp_probs_b (correction bias),
weights = the chosen scores, renormalised (expert_weights_norm) and times expert_weights_scale,
plus expert_shared_count always-on shared experts.

block_count counts the nextn_predict_layers MTP (multi-token prediction) blocks that llama.cpp's
converter appends after the trunk (blk.{L}.nextn.*): they are not loaded and never run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from dsd.errors import UnsupportedModelError
from dsd.shard.models.deepseek2 import deepseek_ffn
from dsd.shard.models.llama import Model, ModelArgs
from dsd.shard.models.qwen import QwenAttention, neox_rope
from dsd.shard.moe import GATING_SIGMOID


@dataclass
class Glm4MoeArgs(ModelArgs):
    dense_lead: int = 1
    n_nextn: int = 0               # MTP blocks after the trunk (not run)
    gating: int = GATING_SIGMOID
    weights_norm: bool = True
    weights_scale: float = 1.0
    n_groups: int = 1
    n_groups_used: int = 1

    @classmethod
    def from_dict(cls, meta: dict, arch: str | None = None, vocab_size: int | None = None) -> "Glm4MoeArgs":
        base = ModelArgs.from_dict(meta, arch, vocab_size)
        arch = base.arch

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        nextn = int(g("nextn_predict_layers", 0) or 0)
        if not 0 <= nextn < base.n_layers:
            raise UnsupportedModelError(f"{arch}: nextn_predict_layers {nextn} does not fit "
                                        f"block_count {base.n_layers}")
        if base.rope_dim > base.head_dim or base.rope_dim % 2:
            raise UnsupportedModelError(f"{arch}: rope.dimension_count {base.rope_dim} must be even "
                                        f"and at most the head size {base.head_dim}")
        return cls(**{**asdict(base), "n_layers": base.n_layers - nextn},
                   dense_lead=int(g("leading_dense_block_count", 0) or 0), n_nextn=nextn,
                   gating=int(g("expert_gating_func", GATING_SIGMOID) or GATING_SIGMOID),
                   weights_norm=bool(g("expert_weights_norm", False)),
                   weights_scale=float(g("expert_weights_scale", 0.0) or 0.0),
                   n_groups=int(g("expert_group_count", 1) or 1),
                   n_groups_used=int(g("expert_group_used_count", 0) or 0))


class Glm4MoeModel(Model):
    def __init__(self, args: Glm4MoeArgs, weights):
        self.args = a = args
        w = weights
        self.init_embeddings(w)
        self.rope = neox_rope(a)
        self.attn_norm, self.ffn_norm, self.attn, self.ffn = [], [], [], []
        for i in range(a.n_layers):   # the trunk only: blk.{n_layers}.. are the MTP blocks
            p = f"blk.{i}."
            self.attn_norm.append(w.vector(p + "attn_norm.weight"))
            self.ffn_norm.append(w.vector(p + "post_attention_norm.weight"))
            self.attn.append(QwenAttention(a, w, i, self.rope))
            self.ffn.append(deepseek_ffn(a, w, i))


def build(gguf_model, weights) -> Glm4MoeModel:
    meta = gguf_model.metadata
    arch = gguf_model.architecture
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelError(f"{gguf_model.path}: {arch} with rope.scaling.type {scaling!r} "
                                    "is not supported (none or linear)")
    if any(meta.get(f"{arch}.rope.dimension_sections") or ()):  # GLM-4.5V's M-RoPE (vision)
        raise UnsupportedModelError(f"{gguf_model.path}: {arch} with M-RoPE sections (the vision "
                                    "model) is not supported")
    emb = gguf_model.tensors["token_embd.weight"]
    return Glm4MoeModel(Glm4MoeArgs.from_dict(meta, vocab_size=emb.shape[0]), weights)
