"""A decoder-only transformer of the Llama / Qwen3 family, with a KV cache for generation.

RMSNorm, rotary position embeddings (RoPE, the "rotate half" layout HF uses), grouped-query
attention through `scaled_dot_product_attention`, optional per-head QK-norm (Qwen3), SwiGLU MLP,
optional tied embeddings, no biases. Parameter names match Hugging Face's Llama/Qwen3 modules
(minus the leading ``model.``) so export and import are a rename, not a conversion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echolm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables (length, head_dim) in fp32, HF layout: frequencies repeated twice."""
    d = cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2) of x (B, H, T, d) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_kv_head, max_len, head_dim).

    All rows share one write position (prompts are left-padded); `valid` marks which cached
    positions hold real tokens so padding is never attended to.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # next position id per row
        self.len = 0
        self.max_len = max_len

    def reorder(self, index: Tensor) -> None:
        """Keep only rows `index` (e.g. drop finished sequences)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.valid, self.pos = self.valid[index], self.pos[index]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.d = layer, cfg.n_head, cfg.n_kv_head, cfg.d_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.d_head, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.d_head, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.d_head, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.d_head, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.d_head, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.d_head, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values, attend over everything so far
            start, end = cache.len, cache.len + T
            cache.k[self.layer, :, :, start:end] = k
            cache.v[self.layer, :, :, start:end] = v
            k, v = cache.k[self.layer, :, :, :end], cache.v[self.layer, :, :, :end]
        causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # residual branches start as identity: stable early training
            elif name == "embed_tokens.weight":
                p.normal_(0.0, std if self.cfg.tie_embeddings else 1.0)
            elif name == "lm_head.weight":
                p.zero_()  # uniform first prediction: initial loss is exactly ln(vocab)
            else:
                # fan-in scaled (1/sqrt(d)), uniform like nanochat: well-conditioned for Muon
                bound = math.sqrt(3.0) / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound)

    def forward(self, idx: Tensor, cache: KVCache | None = None,
                valid: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        Training: no cache, positions 0..T-1, plain causal attention. Generation: with a cache;
        `valid` (B, T) marks real tokens (False = left padding), which are never attended to
        and do not advance a row's position.
        """
        B, T = idx.shape
        mask = None
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            start, end = cache.len, cache.len + T
            if end > cache.max_len:
                raise ValueError(f"KV cache full: {start} + {T} > {cache.max_len}")
            real = valid if valid is not None else torch.ones_like(idx, dtype=torch.bool)
            cache.valid[:, start:end] = real
            positions = (cache.pos[:, None] + real.long().cumsum(1) - 1).clamp_(min=0)
            cache.pos += real.sum(1)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            padded = not bool(cache.valid[:, :end].all())
            if padded or (start > 0 and T > 1):
                # causal within the chunk, real keys only; a query always sees itself so that
                # a padding row never has an empty softmax (which would give NaN)
                causal = torch.ones(T, end, dtype=torch.bool, device=idx.device).tril(start)
                self_pos = torch.zeros_like(causal)
                self_pos[torch.arange(T), torch.arange(start, end)] = True
                mask = ((causal[None] & cache.valid[:, None, :end]) | self_pos[None])[:, None]
        x = self.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.len += T
        return self.lm_head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention."""
        c = self.cfg
        matmul_params = self.num_params(non_embedding=True) + c.vocab_size * c.n_embd
        attention = 12 * c.n_layer * c.n_head * c.d_head * seq_len / 2  # causal: half the scores
        return 6 * matmul_params + attention
