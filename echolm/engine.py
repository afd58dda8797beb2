"""Generation: prefill a batch of prompts into a preallocated KV cache, then decode one token
at a time, sampling with temperature / top-k / top-p / repetition penalty, stopping per row at
an end token or a length limit. Streaming yields text that never splits a UTF-8 character.

The server's continuous batcher (`echolm.serve.batcher`) uses the same pieces: the sampler
(`sample_rows`, each row with its own settings and, if seeded, its own generator; `sample_next`
is it with one setting for every row), the token-piece table (`TokenPieces`) and the UTF-8
streamer (`Utf8Stream`, which also cuts at stop strings).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    temperature, top_k, top_p = _row_settings(p, logits.shape[0], logits.device)
    return filter_rows(logits, temperature, top_k, top_p)


def _row_settings(p: SamplingParams, n: int, device: torch.device) -> tuple[Tensor, ...]:
    """`p`'s temperature, top_k and top_p for `n` rows, as `filter_rows` takes them."""
    return (torch.full((n,), p.temperature, device=device),
            torch.full((n,), p.top_k, device=device),
            torch.full((n,), p.top_p, dtype=torch.float64, device=device))


def filter_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """`filter_logits` with every row's own settings (tensors (B,); temperature > 0, top_k 0
    and top_p >= 1 = off; top_p in float64 to compare as a Python float would). A row's result
    does not depend on the rows beside it."""
    logits = logits / temperature[:, None].to(logits.dtype)
    V = logits.shape[-1]
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        # keep every token at least as likely as the k-th (ties with it are kept too)
        k = torch.where(k_on, top_k, 1).long()
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, k[:, None] - 1)
        kth = kth.masked_fill(~k_on[:, None], float("-inf"))  # rows without top-k keep all
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p_on = top_p < 1.0
    if bool(p_on.any()):
        # keep the smallest set of most likely tokens whose probabilities sum to >= top_p:
        # drop a token once the tokens ranked before it already reach top_p (the most likely
        # token is always kept). Float32 sums are off by a few ulps, so a set that reaches
        # top_p exactly (0.5 + 0.3 for top_p=0.8) can sum to 0.79999995: allow 1e-6 slack.
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        before = sorted_logits.softmax(-1).cumsum(-1)[:, :-1]  # mass ranked before each token
        reach = (top_p.double() - 1e-6).to(before.dtype)[:, None]
        reached = (before >= reach) & p_on[:, None]
        drop = torch.cat([torch.zeros_like(reached[:, :1]), reached], 1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of `probs` (B, V), drawn in proportion to it: the inverse of the
    cumulative sum at one uniform number per row. `torch.multinomial` draws V exponential
    numbers per row instead, ~30x the cost with a 49k vocabulary (a tenth of a 135M model's
    decode step on a CPU). A token of probability 0 is never drawn (its interval is empty);
    the sum is in float64 so that no small probability vanishes in the running total."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device,
                   dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def sample_rows(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                generators: Generators = None) -> Tensor:
    """One token per row of logits (B, V), every row with its own settings (tensors (B,)):
    the sampler of the engine and of the server's batcher.

    Greedy rows (temperature <= 0) take the argmax. The others draw from `filter_rows`'s
    distribution (`draw`). `generators`: None (torch's global generator), one
    generator for the whole batch (the engine: a seeded batch), or one per row, None for rows
    without a seed (the server: a seeded row draws with its own generator, so its tokens do not
    depend on which other rows share the batch).
    """
    logits = logits.float()
    greedy = temperature <= 0
    best = logits.argmax(-1)
    if bool(greedy.all()):
        return best
    probs = filter_rows(logits, torch.where(greedy, 1.0, temperature), top_k, top_p).softmax(-1)
    if generators is None or isinstance(generators, torch.Generator):
        picked = draw(probs, generators)
        return torch.where(greedy, best, picked)
    picked = best.clone()
    sampled = [i for i, g in enumerate(greedy.tolist()) if not g]
    shared = [i for i in sampled if generators[i] is None]
    if shared:
        picked[shared] = draw(probs[shared])
    for i in sampled:
        if generators[i] is not None:
            picked[i] = draw(probs[i:i + 1], generators[i])[0]
    return picked


def sample_next(logits: Tensor, p: SamplingParams, history: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row from logits (B, V), every row with the settings `p` (and, if it
    asks for one, the repetition penalty over `history`), through `sample_rows`."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = penalize_repeats(logits, history, p.repetition_penalty)
    temperature, top_k, top_p = _row_settings(p, logits.shape[0], logits.device)
    return sample_rows(logits, temperature, top_p, top_k, generator)


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

    @classmethod
    def forget(cls, model: nn.Module) -> None:
        """Free the decoder kept for `model` (a copy of every weight): an update is about to
        change the weights, so it would be rebuilt anyway, and keeping it through the
        update's forward/backward only adds a model's size to the peak memory (RL)."""
        cls._last.pop(model, None)

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
                 pad_id: int = 0, fast: bool | None = None,
                 on_draw: Callable[[Tensor, Tensor, Tensor], None] | None = None
                 ) -> Iterator[Tensor]:
    """Yield, at each decode step, the new token of every row (B,), -1 for finished rows.
    `on_draw` sees each step's rows still computed (their original indices), their logits
    (rows, V) and the tokens drawn from them (`echolm explain` shows the candidates; RL keeps
    the sampler's log-probabilities).

    Prompts of different lengths are left-padded into one batch; one forward pass per step.
    Identical prompts (a GRPO group, pass@k samples) are read once and their cache rows copied.
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
    first: dict[tuple[int, ...], int] = {}
    row_of = [first.setdefault(tuple(x), len(first)) for x in prompts]
    unique = [list(x) for x in first]
    idx = torch.full((len(unique), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(unique), L, dtype=torch.bool)
    for i, x in enumerate(unique):
        idx[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
        valid[i, L - len(x):] = True
    idx, valid = idx.to(device), valid.to(device)
    # the last generated token is never fed back: the cache holds L + n_new - 1 positions
    cache = KVCache(model.cfg, len(unique), L + n_new - 1, device=device, dtype=dtype)
    gen = None
    if p.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed)
    history = None
    if p.repetition_penalty != 1.0:  # padding is not part of a row's text: repeat a real token
        history = torch.where(valid, idx, idx[:, -1:])[row_of]
    use_fast = fast if fast is not None else device.type == "cpu"
    decoder = FastDecoder.get(model, B) if use_fast else None
    stop = torch.tensor(list(p.stop_ids), device=device) if p.stop_ids else None
    rows = torch.arange(B, device=device)  # the original row of each row still computed
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(idx, cache, valid, last_only=True)[:, -1]
    if len(unique) < B:
        index = torch.tensor(row_of, device=device)
        cache.reorder(index)
        logits = logits[index]
    for i in range(n_new):
        nxt = sample_next(logits, p, history, gen)
        if on_draw is not None:
            on_draw(rows, logits, nxt)
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


class TokenPieces:
    """The token-piece table: every id of a vocabulary of `size` ids (a model may have more
    rows than its tokenizer has tokens) as the bytes it adds to the text, and as a readable
    string (logprobs). `specials`: "name" spells a special token by its name (`<|bos|>`), as
    the server's answers do; "silent" gives it no bytes (the tokenizer's `token_bytes`). Ids
    past the tokenizer's are `<|unused_N|>` by name, or silent."""

    def __init__(self, tok: Tokenizer, size: int | None = None, specials: str = "name") -> None:
        if specials not in ("name", "silent"):
            raise ValueError(f"specials must be 'name' or 'silent', got {specials!r}")
        known = tok.token_bytes
        size = len(known) if size is None else size
        if specials == "silent":  # the tokenizer's own table (shared, not copied)
            self.bytes = known if size == len(known) else (known + [b""] * size)[:size]
        else:
            names = {i: name.encode() for name, i in tok.special.items()}
            self.bytes = [names[i] if i in names else known[i] if i < tok.vocab_size
                          else f"<|unused_{i}|>".encode() for i in range(size)]

    def __len__(self) -> int:
        return len(self.bytes)

    @cached_property
    def strings(self) -> list[str]:
        """Each piece as text (bytes that are not whole UTF-8 characters as \\xNN escapes)."""
        return [b.decode("utf-8", errors="backslashreplace") for b in self.bytes]

    @cached_property
    def byte_lists(self) -> list[list[int]]:
        return [list(b) for b in self.bytes]


class Utf8Stream:
    """Turns token ids into text pieces without ever emitting half a UTF-8 character: bytes
    that do not yet form a whole character wait for the next token (a token can end in the
    middle of a multi-byte character).

    `pieces`: a tokenizer (its special tokens add no text), a `TokenPieces` table, or the
    bytes of each token id. With stop strings, the text stops before the first one (`stopped`
    turns True; the stop string itself is never emitted), and text that could be the start of
    one is held back until it cannot."""

    def __init__(self, pieces: Tokenizer | TokenPieces | Sequence[bytes],
                 stops: Sequence[str] = ()) -> None:
        if isinstance(pieces, Tokenizer):
            pieces = TokenPieces(pieces, specials="silent")
        self.pieces = pieces.bytes if isinstance(pieces, TokenPieces) else pieces
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stops if s]
        self.text = ""  # with stop strings: everything decoded so far (cut at a stop string)
        self.sent = 0  # how much of it has been emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text that can be emitted after `token_id`."""
        new = self.decoder.decode(self.pieces[token_id], final=False)
        if not self.stops:
            return new
        self.text += new
        hit = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            out, self.text = self.text[self.sent:hit], self.text[:hit]
            self.sent, self.stopped = hit, True
            return out
        hold = 0  # longest tail of the text that is the start of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        """The rest at the end of generation (held-back text no longer can become a stop)."""
        new = self.decoder.decode(b"", final=True)
        if not self.stops:
            return new
        self.text += new
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], upto
        return out
