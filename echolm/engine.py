"""Generation: prefill a batch of prompts into a preallocated KV cache, then decode one token
at a time, sampling with temperature / top-k / top-p / repetition penalty, stopping per row at
an end token or a length limit. Streaming yields text that never splits a UTF-8 character.

On CPU the decode steps run through `FastDecoder`: the model's own math for one token, with
the weights copied once into the layout the CPU matmul kernels are fastest with (q/k/v and
gate/up fused into one matrix each). A decode step of a small model is a few dozen
matrix-vector products, so the matmul layout decides the speed; the copies cost as much memory
as the model's matrices (`generate_ids(..., fast=False)` decodes through `Transformer.forward`
instead, with no copies).
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from echolm.model import KVCache, Transformer, apply_rope
from echolm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 makes already-seen tokens less likely
    seed: int | None = None
    stop_ids: Sequence[int] = field(default_factory=tuple)


def penalize_repeats(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL-style repetition penalty: each token id in `history` (B, n) gets its logit divided
    by `penalty` if positive, multiplied by it if negative (less likely either way)."""
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def filter_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) of logits (B, V): the logits whose softmax
    is the distribution `sample_next` draws from (-inf = never drawn). Not for temperature 0."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # keep the smallest set of most likely tokens whose probabilities sum to >= top_p:
        # drop a token once the tokens ranked before it already reach top_p (the most likely
        # token is always kept). Float32 sums are off by a few ulps, so a set that reaches
        # top_p exactly (0.5 + 0.3 for top_p=0.8) can sum to 0.79999995: allow 1e-6 slack.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        before = sorted_logits.softmax(-1).cumsum(-1)[:, :-1]  # mass ranked before each token
        drop = torch.cat([torch.zeros_like(before[:, :1], dtype=torch.bool),
                          before >= p.top_p - 1e-6], 1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, p: SamplingParams, history: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row from logits (B, V)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = penalize_repeats(logits, history, p.repetition_penalty)
    if p.temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class FastDecoder:
    """Decode steps (one new token per row) with `model`'s math and weights copied into the
    layout the CPU matmul kernels are fastest with for `batch` rows.

    batch 1: transposed (in, out) contiguous matrices through `torch.mm` -- MKL's kernel for
    x @ W.T, which is what `F.linear` runs, is about 1.4x slower than for x @ W_t on one row.
    batch > 1: oneDNN's prepacked weights (`mkldnn._linear_pointwise`, what inductor uses
    after freezing), about 2x faster than `F.linear` for 2-16 rows.
    q/k/v and gate/up are fused into one matrix each: one matmul instead of three and two.
    The copies do not follow later changes of the weights: `FastDecoder.get` rebuilds when
    they changed.
    """

    _last: weakref.WeakKeyDictionary[Transformer, FastDecoder] = weakref.WeakKeyDictionary()

    @classmethod
    def get(cls, model: Transformer, batch: int) -> FastDecoder:
        """The decoder built last for `model` if it is for `batch` rows and no weight changed
        since (optimizer steps, load_state_dict and other in-place writes bump a tensor's
        version counter; writes through `.data` do not), else a new one. Packing costs about
        as much as a few decode steps; keeping one decoder per model saves it on every call of
        a chat or an evaluation, at the price of keeping the copies while the model lives."""
        dec = cls._last.get(model)
        if dec is None or dec.batch != batch or dec.version != _weights_version(model):
            cls._last.pop(model, None)  # free the old copies before making new ones
            dec = cls._last[model] = cls(model, batch)
        return dec

    def __init__(self, model: Transformer, batch: int) -> None:
        cfg = model.cfg
        self.cfg, self.batch = cfg, batch
        self.model = weakref.ref(model)  # the cache above must not keep the model alive
        self.version = _weights_version(model)
        w = model.lm_head.weight
        self.packed = (batch > 1 and w.device.type == "cpu" and w.dtype in _ONEDNN_DTYPES
                       and _onednn_linear_available())
        with torch.no_grad():
            self.layers = []
            for block in model.layers:
                attn, mlp = block.self_attn, block.mlp
                q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
                qkv = torch.cat([q.weight, k.weight, v.weight])
                qkv_bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                self.layers.append((
                    block.input_layernorm.weight, self._pack(qkv), qkv_bias, attn.q_norm,
                    attn.k_norm, self._pack(attn.o_proj.weight),
                    block.post_attention_layernorm.weight, self._pack(gate_up),
                    self._pack(mlp.down_proj.weight)))
            self.lm_head = self._pack(model.lm_head.weight)

    def _pack(self, w: Tensor) -> Tensor:
        if self.packed:
            return torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch)
        # (empty + copy_ is several times faster than .t().contiguous() for this transpose)
        return torch.empty(w.shape[1], w.shape[0], dtype=w.dtype,
                           device=w.device).copy_(w.detach().t())

    def _linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.default(x, w, bias, "none", [], "")
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)

    def __call__(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, vocab) for one new token per row, idx (B,); appends to `cache`."""
        m, c, lin = self.model(), self.cfg, self._linear
        B, H, KV, d, D, eps = idx.shape[0], c.n_head, c.n_kv_head, c.d_head, c.n_embd, c.norm_eps
        cos, sin, mask = m.cache_inputs(cache, 1, None, idx.device)
        x = m.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        t = cache.len
        for i, (norm1, w_qkv, b_qkv, q_norm, k_norm, w_o, norm2, w_gate_up, w_down) in enumerate(
                self.layers):
            # one token per row: (B, heads * d) reshapes to (B, heads, 1, d) without a copy
            qkv = lin(F.rms_norm(x, (D,), norm1, eps), w_qkv, b_qkv)
            qk, v = qkv.split([(H + KV) * d, KV * d], 1)
            if q_norm is None:  # rotate q and k in one go
                q, k = apply_rope(qk.view(B, H + KV, 1, d), cos, sin).split([H, KV], 1)
            else:
                q, k = qk.view(B, H + KV, 1, d).split([H, KV], 1)
                q, k = apply_rope(q_norm(q), cos, sin), apply_rope(k_norm(k), cos, sin)
            k_cache, v_cache = cache.layers[i]
            k_cache.select(2, t).copy_(k.squeeze(2))
            v_cache.select(2, t).copy_(v.view(B, KV, d))
            y = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, t + 1),
                                               v_cache.narrow(2, 0, t + 1), attn_mask=mask,
                                               enable_gqa=KV != H)
            x = x + lin(y.reshape(B, H * d), w_o)
            gate, up = lin(F.rms_norm(x, (D,), norm2, eps), w_gate_up).chunk(2, dim=-1)
            x = x + lin(F.silu(gate) * up, w_down)
        cache.len += 1
        return lin(F.rms_norm(x, (D,), m.norm.weight, eps), self.lm_head)


def _weights_version(model: Transformer) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_linear_pointwise")


@torch.inference_mode()
def generate_ids(model: Transformer, prompts: list[list[int]], p: SamplingParams,
                 pad_id: int = 0, fast: bool | None = None) -> Iterator[Tensor]:
    """Yield, at each decode step, the new token of every row (B,), -1 for finished rows.

    Prompts of different lengths are left-padded into one batch; one forward pass per step.
    `fast` (default: on CPU) decodes through `FastDecoder`, else through `Transformer.forward`.
    Once half of the rows still computed have finished, they are dropped from the batch
    (their cache rows too): answers of very different lengths cost what the long ones need,
    not batch x the longest. Sampling then draws for fewer rows, so a seeded batch's answers
    are those of this procedure (deterministic for a seed and batch, as before).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B, L = len(prompts), max(len(x) for x in prompts)
    if L >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {L} tokens leaves no room (max_seq_len "
                         f"{model.cfg.max_seq_len})")
    n_new = min(p.max_tokens, model.cfg.max_seq_len - L)
    if n_new <= 0:
        return
    idx = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, x in enumerate(prompts):
        idx[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
        valid[i, L - len(x):] = True
    idx, valid = idx.to(device), valid.to(device)
    # the last generated token is never fed back: the cache holds L + n_new - 1 positions
    cache = KVCache(model.cfg, B, L + n_new - 1, device=device, dtype=dtype)
    gen = None
    if p.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed)
    history = None
    if p.repetition_penalty != 1.0:  # padding is not part of a row's text: repeat a real token
        history = torch.where(valid, idx, idx[:, -1:])
    use_fast = fast if fast is not None else device.type == "cpu"
    decoder = FastDecoder.get(model, B) if use_fast else None
    stop = torch.tensor(list(p.stop_ids), device=device) if p.stop_ids else None
    rows = torch.arange(B, device=device)  # the original row of each row still computed
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(idx, cache, valid)[:, -1]
    for i in range(n_new):
        nxt = sample_next(logits, p, history, gen)
        if stop is not None:
            nxt = nxt.masked_fill(done, -1)
            done |= torch.isin(nxt, stop)
        if len(rows) == B:
            yield nxt
        else:
            yield torch.full((B,), -1, dtype=nxt.dtype, device=device).index_copy_(0, rows, nxt)
        if i == n_new - 1 or (stop is not None and bool(done.all())):
            return
        feed = nxt.clamp(min=0) if stop is not None else nxt  # finished rows feed any token
        if history is not None:
            history = torch.cat([history, feed[:, None]], 1)
        if stop is not None and 2 * int(done.sum()) >= len(rows) > 1:
            keep = (~done).nonzero().squeeze(1)
            cache.reorder(keep)
            rows, done, feed = rows[keep], done[keep], feed[keep]
            history = history[keep] if history is not None else None
            decoder = FastDecoder.get(model, len(rows)) if use_fast else None
        logits = decoder(feed, cache) if decoder else model(feed[:, None], cache)[:, -1]


def generate(model: Transformer, tok: Tokenizer, prompts: list[list[int]],
             p: SamplingParams) -> list[list[int]]:
    """Completed token ids per prompt (stop token excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(p.stop_ids)
    for step in generate_ids(model, prompts, p, pad_id=tok.pad):
        for i, t in enumerate(step.tolist()):
            if t >= 0 and t not in stops:
                out[i].append(t)
    return out


class Utf8Stream:
    """Turns token ids into text pieces without ever emitting half a UTF-8 character: bytes
    that do not yet form a whole character wait for the next token (a token can end in the
    middle of a multi-byte character)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tok.token_bytes[token_id], final=False)

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
