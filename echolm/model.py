"""A decoder-only transformer of the Llama / Qwen3 family, with a KV cache for generation.

RMSNorm, rotary position embeddings (RoPE, the "rotate half" layout HF uses), grouped-query
attention through `scaled_dot_product_attention`, optional per-head QK-norm (Qwen3), SwiGLU MLP,
optional tied embeddings, no biases except optional q/k/v ones (Qwen2's `attention_bias`).
Parameter names match Hugging Face's Llama/Qwen3 modules
(minus the leading ``model.``) so export and import are a rename, not a conversion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echolm.config import ModelConfig
from echolm.losses import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # weight in the input's dtype: under bf16 autocast this keeps the fused kernel
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


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
    positions hold real tokens so padding is never attended to. `padded` (a Python bool) says
    whether any row has padding at all: without it, a decode step needs no mask and every row's
    position is `len`, so the step builds no index or mask tensors.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # next position id per row
        self.padded = False
        self.len = 0
        self.max_len = max_len
        self._split()

    def _split(self) -> None:
        self.layers = [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]  # views

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a chunk's keys/values (B, H, T, d) at the write position (in place); return
        every cached one so far."""
        start, end = self.len, self.len + k.shape[2]
        k_cache, v_cache = self.layers[layer]
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep only rows `index` (e.g. drop finished sequences)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.valid, self.pos = self.valid[index], self.pos[index]
        self.padded = not bool(self.valid[:, :self.len].all())
        self._split()


class SharedPrompts:
    """Prompts read once for all the answers that continue them (training: a GRPO group, a DPO
    pair), packed with the answers into one row of tokens so every projection and MLP is one
    matrix product over all of them (one weight gradient, not one per part). Attention splits
    the row again: U prompts (U, P) attend causally within themselves (`mask_p`, None = plain
    causal); N answers (N, A) attend to their prompt's keys/values (prompt `rows[i]`) and
    causally to their own (`mask_a`). Unlike KVCache nothing is written in place, so
    gradients flow back into each prompt's positions as if every answer had read it."""

    def __init__(self, rows: Tensor, prompts: tuple[int, int], answers: tuple[int, int],
                 rope_p: tuple[Tensor, Tensor], mask_p: Tensor | None,
                 rope_a: tuple[Tensor, Tensor], mask_a: Tensor) -> None:
        self.rows, self.prompts, self.answers = rows, prompts, answers
        self.rope_p, self.mask_p, self.rope_a, self.mask_a = rope_p, mask_p, rope_a, mask_a
        self.prompt_kv: tuple[Tensor, Tensor] | None = None

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.prompt_kv is None:  # the prompts' pass: kept for their answers
            self.prompt_kv = (k, v)
            return k, v
        pk, pv = self.prompt_kv
        # index_select, not pk[rows]: rows repeat (answers share a prompt), and indexing's
        # backward adds their gradients with atomics in whatever order the threads run (RL
        # runs differed from step 2 on); index_select's backward adds them in row order
        return (torch.cat([pk.index_select(0, self.rows), k], 2),
                torch.cat([pv.index_select(0, self.rows), v], 2))

    def attention(self, attn: Attention, x: Tensor) -> Tensor:
        """`attn` over the packed row x (1, U*P + N*A, D)."""
        (U, P), (N, A) = self.prompts, self.answers
        n = U * P
        q, k, v = attn.q_proj(x)[0], attn.k_proj(x)[0], attn.v_proj(x)[0]

        def heads(t: Tensor, lo: int, hi: int, rows: int, length: int) -> Tensor:
            return t[lo:hi].view(rows, length, -1, attn.d).transpose(1, 2)

        self.prompt_kv = None
        out = [attn.attend(*(heads(t, 0, n, U, P) for t in (q, k, v)), *self.rope_p, self,
                           self.mask_p)]
        if A:
            out.append(attn.attend(*(heads(t, n, n + N * A, N, A) for t in (q, k, v)),
                                   *self.rope_a, self, self.mask_a))
        y = torch.cat([o.transpose(1, 2).reshape(-1, attn.n_head * attn.d) for o in out])
        return attn.o_proj(y[None])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.d = layer, cfg.n_head, cfg.n_kv_head, cfg.d_head
        bias = cfg.attention_bias  # q/k/v biases (Qwen2); off for Echo's own models
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.d_head, bias=bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.d_head, bias=bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.d_head, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.d_head, cfg.n_embd, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.d_head, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.d_head, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | SharedPrompts | None,
                mask: Tensor | None) -> Tensor:
        if isinstance(cache, SharedPrompts):  # a packed row of prompts and their answers
            return cache.attention(self, x)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        y = self.attend(q, k, v, cos, sin, cache, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
               cache: KVCache | SharedPrompts | None, mask: Tensor | None) -> Tensor:
        """Heads (B, H, T, d) in, attention out (B, H, T, d): QK-norm, RoPE, the cache (what
        earlier positions left), scaled dot-product attention (mask None: causal)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # attend over everything so far (the prompt, earlier tokens)
            k, v = cache.extend(self.layer, k, v)
        T = q.shape[2]
        causal = mask is None and k.shape[2] == T and T > 1
        if attend_in_fp32(q):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   attn_mask=mask, is_causal=causal,
                                                   enable_gqa=self.n_kv != self.n_head)
            return y if torch.is_autocast_enabled("cpu") else y.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_kv != self.n_head)


def attend_in_fp32(q: Tensor) -> bool:
    """Whether bf16 attention (bf16 heads, or bf16 autocast) should run in fp32 instead: on a
    CPU when a backward will follow. torch's CPU flash-attention backward is ~2x slower in
    bf16 than in fp32 (AMX too: 12.1 vs 6.0 ms forward + backward for a DPO batch's 4 x 9
    heads x 87 x 127 positions); its bf16 forward is faster, so sampling and reference
    passes keep bf16."""
    if q.device.type != "cpu" or not (q.requires_grad and torch.is_grad_enabled()):
        return False
    return q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | SharedPrompts | None,
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
            elif name.endswith(".bias"):
                p.zero_()
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
                valid: Tensor | None = None, targets: Tensor | None = None,
                loss_mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with `targets` (B, T) (training, no
        cache) the mean cross-entropy over `loss_mask` instead, computed without the logits;
        with `last_only`, the logits (B, 1, vocab) of the last position only.

        Training: no cache, positions 0..T-1, plain causal attention. Generation: with a cache;
        `valid` (B, T) marks real tokens (False = left padding), which are never attended to
        and do not advance a row's position.
        """
        B, T = idx.shape
        mask = None
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin, mask = self.cache_inputs(cache, T, valid, idx.device)
        x = self.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.len += T
        if targets is not None:
            return linear_cross_entropy(self.norm(x), self.lm_head.weight, targets, loss_mask)
        if last_only:  # a prompt read before decoding: only its last position is predicted
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def cache_inputs(self, cache: KVCache, T: int, valid: Tensor | None,
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Record which of the next T cached positions are real; return the RoPE rows and the
        attention mask (None when plain attention is right) for this chunk."""
        start, end = cache.len, cache.len + T
        if end > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {T} > {cache.max_len}")
        if valid is None:
            cache.valid[:, start:end] = True
        else:
            cache.valid[:, start:end] = valid
            cache.padded = cache.padded or not bool(valid.all())
        if not cache.padded:  # every row is at position `start`: slices, no mask for a step
            cache.pos += T
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
            if start == 0 or T == 1:
                return cos, sin, None  # plain causal (prefill) / attend to everything (step)
            causal = torch.ones(T, end, dtype=torch.bool, device=device).tril(start)
            return cos, sin, causal
        if valid is None and T == 1:  # decode step with padding: each row at its own position
            positions = cache.pos[:, None].clone()
            cache.pos += 1
            mask = cache.valid[:, None, None, :end]  # real keys only (the new one is real)
        else:
            real = valid if valid is not None else torch.ones(cache.valid.shape[0], T,
                                                              dtype=torch.bool, device=device)
            positions = (cache.pos[:, None] + real.long().cumsum(1) - 1).clamp_(min=0)
            cache.pos += real.sum(1)
            # causal within the chunk, real keys only; a query always sees itself so that
            # a padding row never has an empty softmax (which would give NaN)
            causal = torch.ones(T, end, dtype=torch.bool, device=device).tril(start)
            self_pos = torch.zeros_like(causal)
            self_pos[torch.arange(T), torch.arange(start, end)] = True
            mask = ((causal[None] & cache.valid[:, None, :end]) | self_pos[None])[:, None]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None], mask

    def hidden_states(self, idx: Tensor) -> Tensor:
        """Final normalised hidden states (B, T, n_embd) of token ids (B, T): `forward` without a
        cache and without `lm_head`. For other heads (a reward model's score) and for logits
        at a few positions only (DPO's response tokens)."""
        T = idx.shape[1]
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, None, None)
        return self.norm(x)

    def prompt_answer_states(self, prompts: Tensor, real: Tensor, answers: Tensor, rows: Tensor
                             ) -> Tensor:
        """Final normalised hidden states (N, A, n_embd) predicting each answer token: answer
        i (row i of `answers` (N, A), right-padded) continues prompt `rows[i]` of `prompts`
        (U, P), left-padded (`real` False on padding). Each prompt is read once however many
        answers share it (`SharedPrompts`); the numbers are those of `hidden_states` on each
        prompt + answer (up to float rounding), at the positions that predict its tokens."""
        (U, P), A = prompts.shape, answers.shape[1] - 1  # an answer's last token predicts none
        N, dev = len(rows), prompts.device
        pos_p = (real.long().cumsum(1) - 1).clamp(min=0)  # left padding: real tokens from 0
        causal_p = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(P, dtype=torch.bool, device=dev)  # padding sees itself: no empty row
        mask_p = None if bool(real.all()) else (
            (causal_p[None] & real[:, None, :]) | eye[None])[:, None]
        pos_a = real.sum(1)[rows][:, None] + torch.arange(A, device=dev)
        causal_a = torch.ones(A, A, dtype=torch.bool, device=dev).tril()
        mask_a = torch.cat([real[rows][:, None, :].expand(-1, A, -1),
                            causal_a[None].expand(N, -1, -1)], dim=2)[:, None]
        x = self.embed_tokens(torch.cat([prompts.flatten(), answers[:, :-1].flatten()]))[None]

        def rope(pos: Tensor) -> tuple[Tensor, Tensor]:
            return self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype)

        shared = SharedPrompts(rows, (U, P), (N, A), rope(pos_p), mask_p, rope(pos_a), mask_a)
        for block in self.layers:
            x = block(x, None, None, shared, None)
        x = x[0]
        # predicts each answer's first token (index_select: see SharedPrompts.extend)
        last = x[:U * P].view(U, P, -1)[:, -1].index_select(0, rows)[:, None]
        return self.norm(torch.cat([last, x[U * P:].view(N, A, x.shape[-1])], dim=1))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, 4 per frozen one
        (no weight gradient: LoRA's base), plus attention."""
        c = self.cfg
        matmul_params = self.num_params(non_embedding=True) + c.vocab_size * c.n_embd
        frozen = sum(p.numel() for name, p in self.named_parameters()
                     if not p.requires_grad and name != "embed_tokens.weight")
        if c.tie_embeddings and not self.embed_tokens.weight.requires_grad:
            frozen += c.vocab_size * c.n_embd  # the head is the embedding
        attention = 12 * c.n_layer * c.n_head * c.d_head * seq_len / 2  # causal: half the scores
        return 6 * matmul_params - 2 * frozen + attention
