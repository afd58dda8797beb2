"""Continuous batching: every active sequence of every request decodes together, one forward
pass per step, on one engine thread.

A `Batch` holds the rows (one per generated choice) that share one model, with one KV cache.
Rows are right-aligned in the cache: row r's tokens fill the last `len(r)` columns and the
columns to its left are padding (`valid` False), so one write position serves every row while
each row keeps its own RoPE position (`KVCache.pos`). A new request is prefilled in a cache of
its own and merged in at the next step boundary: the shorter of the two caches gets padding
columns on the left. A finished, stopped or cancelled row is dropped at once and columns that
no remaining row uses are cut off, so the cache is never longer than the longest live row
(<= the model's context), however long the batch keeps running.

Per step: sample the next token of every row from the last logits (the engine's `sample_rows`,
each row with its own temperature / top-k / top-p / seeded generator), turn tokens into text
(the engine's `Utf8Stream` over a `TokenPieces` table: never half a UTF-8 character; text that
could be the start of a stop string waits), hand each request its events, drop finished rows,
then feed the survivors' tokens in one forward pass. The engine never waits for a client:
events go to a callback that only queues them, so a slow reader cannot hold up the batch, and
a client that leaves is removed before the next forward pass.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from echolm.engine import TokenPieces, Utf8Stream, sample_rows
from echolm.model import KVCache, Transformer
from echolm.tokenizer import Tokenizer


@dataclass
class RowParams:
    """How one row samples. temperature 0 = greedy; top_k 0 / top_p 1 = off."""

    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: Sequence[str] = ()


@dataclass
class Event:
    """What one row produced in one step: text (possibly empty: held back or a cut
    character), the token's log-probability entry when asked for, and why it finished."""

    index: int
    text: str
    token: int | None = None  # None for the end token, which is not part of the answer
    logprob: dict | None = None
    finish: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


class GenRequest:
    """One API request: `rows` choices of the same prompt (or several prompts), one model.

    `sink(events)` is called from the engine thread with a list of Events (every row that
    produced something this step); it must not block. `cancel()` may be called from any thread.
    """

    _ids = itertools.count()

    def __init__(self, model: Transformer, prompts: list[list[int]], params: list[RowParams],
                 sink: Callable[[list[Event]], None], stop_ids: Sequence[int] = ()) -> None:
        if len(prompts) != len(params):
            raise ValueError("one RowParams per prompt")
        self.id = next(self._ids)
        self.model = model
        self.prompts = prompts
        self.params = params
        self.sink = sink
        self.stop_ids = frozenset(stop_ids)
        self.cancelled = False
        self.finished = 0
        self.submitted = time.perf_counter()

    @property
    def n(self) -> int:
        return len(self.prompts)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Row:
    req: GenRequest
    index: int
    prompt_len: int
    params: RowParams
    text: Utf8Stream
    generator: torch.Generator | None
    generated: int = 0
    done: bool = False


def row_generator(p: RowParams, device: torch.device | str) -> torch.Generator | None:
    """A seeded sampled row's own generator, seeded as the engine seeds a batch's (so a row
    and `generate_ids` with the same seed draw alike); None for greedy or unseeded rows."""
    if p.seed is None or p.temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed % (2**63))
    return gen


def sample_step(logits: Tensor, params: Sequence[RowParams],
                generators: Sequence[torch.Generator | None]) -> Tensor:
    """The next token of every row of logits (B, V): the engine's `sample_rows`, each row
    with its own settings and generator (`row_generator`)."""
    dev = logits.device
    return sample_rows(logits, torch.tensor([p.temperature for p in params],
                                            dtype=torch.float32, device=dev),
                       torch.tensor([p.top_p for p in params], dtype=torch.float64, device=dev),
                       torch.tensor([p.top_k for p in params], device=dev), generators)


class Batch:
    """The live rows of one model and their KV cache."""

    def __init__(self, model: Transformer, pad_id: int) -> None:
        self.model = model
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.logits: Tensor | None = None  # (B, V): next-token logits of every row

    # ---- cache surgery ------------------------------------------------------------------
    def _combine(self, parts: list[tuple[KVCache, Tensor]]) -> KVCache:
        """A new cache holding rows `idx` of each cache, right-aligned, without the columns
        that none of them uses."""
        spans = []
        for cache, idx in parts:
            used = cache.valid[idx, :cache.len].any(0)
            first = int(used.int().argmax()) if bool(used.any()) else cache.len
            spans.append((first, cache.len))
        L = max(end - first for first, end in spans)
        B = sum(len(idx) for _, idx in parts)
        room = min(self.cfg.max_seq_len, max(L + 1, -(-(L + 64) // 64) * 64))
        out = KVCache(self.cfg, B, room, device=self.device, dtype=self.dtype)
        b = 0
        for (cache, idx), (first, end) in zip(parts, spans, strict=True):
            n, span = len(idx), end - first
            out.k[:, b:b + n, :, L - span:L] = cache.k[:, idx, :, first:end]
            out.v[:, b:b + n, :, L - span:L] = cache.v[:, idx, :, first:end]
            out.valid[b:b + n, L - span:L] = cache.valid[idx, first:end]
            out.pos[b:b + n] = cache.pos[idx]
            b += n
        out.len = L
        out.padded = not bool(out.valid[:, :L].all())
        return out

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into self.rows)."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.logits = None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache = self._combine([(self.cache, idx)])
        self.logits = self.logits[idx]

    def admit(self, rows: list[Row], prompts: list[list[int]]) -> None:
        """Prefill new rows (identical prompts once) and merge them into the batch."""
        unique = list(dict.fromkeys(map(tuple, prompts)))
        where = {p: i for i, p in enumerate(unique)}
        P = max(len(p) for p in unique)
        ids = torch.full((len(unique), P), self.pad_id, dtype=torch.long)
        valid = torch.zeros(len(unique), P, dtype=torch.bool)
        for i, p in enumerate(unique):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, P - len(p):] = True
        cache = KVCache(self.cfg, len(unique), P, device=self.device, dtype=self.dtype)
        logits = self.model(ids.to(self.device), cache, valid.to(self.device),
                            last_only=True)[:, -1]
        pick = torch.tensor([where[tuple(p)] for p in prompts], device=self.device)
        if self.cache is None:
            parts = [(cache, pick)]
        else:
            parts = [(self.cache, torch.arange(len(self.rows), device=self.device)),
                     (cache, pick)]
        self.cache = self._combine(parts)
        logits = logits[pick]
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.rows += rows

    def grow(self) -> None:
        """Make room for one more column."""
        if self.cache is not None and self.cache.len >= self.cache.max_len:
            idx = torch.arange(len(self.rows), device=self.device)
            self.cache = self._combine([(self.cache, idx)])

    def forward(self, tokens: Tensor) -> None:
        self.grow()
        self.logits = self.model(tokens[:, None], self.cache)[:, -1]


class Engine:
    """The engine thread: admits waiting requests, steps every model's batch, delivers events.

    `max_batch` bounds the rows decoding at once over all models; requests beyond it wait
    (first come, first served) and join as rows finish. `deliver(outputs)` receives, once per
    step, a list of (request, events) pairs; by default each request's own sink is called.
    """

    def __init__(self, tok: Tokenizer, max_batch: int = 64,
                 deliver: Callable[[list[tuple[GenRequest, list[Event]]]], None] | None = None
                 ) -> None:
        self.tok = tok
        self.max_batch = max_batch
        self.deliver = deliver or self._deliver_direct
        self._pieces: dict[int, TokenPieces] = {}  # per model vocabulary size
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._batches: dict[int, Batch] = {}
        self._cv = threading.Condition()
        self._stop = False
        self.steps = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._loop, name="echolm-engine", daemon=True)
        self._thread.start()

    # ---- public -------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        if req.n > self.max_batch:
            raise ValueError(f"{req.n} rows exceed the batch limit {self.max_batch}")
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine has stopped")
            self._pending.append(req)
            self._cv.notify()

    def wake(self) -> None:
        """Have the engine look at its requests now (e.g. after a cancel while idle)."""
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        with self._cv:
            return {"active_rows": sum(len(b.rows) for b in self._batches.values()),
                    "waiting_requests": len(self._pending), "steps": self.steps,
                    "tokens": self.tokens}

    # ---- the loop -----------------------------------------------------------------------
    @staticmethod
    def _deliver_direct(outputs: list[tuple[GenRequest, list[Event]]]) -> None:
        for req, events in outputs:
            req.sink(events)

    def _active(self) -> int:
        return sum(len(b.rows) for b in self._batches.values())

    def _take_new(self) -> list[GenRequest]:
        """Waiting requests that fit now (called with the lock held)."""
        taken, room = [], self.max_batch - self._active()
        while self._pending:
            req = self._pending[0]
            if req.cancelled:
                self._pending.popleft()
                continue
            if req.n > room:
                break
            taken.append(self._pending.popleft())
            room -= req.n
        return taken

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while True:
                        if any(r.cancelled for r in self._pending):
                            self._pending = collections.deque(
                                r for r in self._pending if not r.cancelled)
                        if self._stop or self._batches or self._pending:
                            break
                        self._cv.wait()
                    if self._stop:
                        return
                    new = self._take_new()
                outputs: list[tuple[GenRequest, list[Event]]] = []
                for req in new:
                    self._batch(req.model)
                for key in list(self._batches):
                    batch = self._batches[key]
                    mine = [r for r in new if id(r.model) == key]
                    try:
                        self._step(batch, mine, outputs)
                    except Exception as e:  # a failed forward must not take the server down
                        traceback.print_exc()
                        self._fail(batch, mine, f"{type(e).__name__}: {e}", outputs)
                    if not batch.rows:
                        with self._cv:
                            del self._batches[key]
                if outputs:
                    self.deliver(outputs)
                self.steps += 1

    def _batch(self, model: Transformer) -> Batch:
        key = id(model)
        if key not in self._batches:
            with self._cv:
                self._batches[key] = Batch(model, self.tok.pad)
        return self._batches[key]

    def _pieces_for(self, model: Transformer) -> TokenPieces:
        size = model.cfg.vocab_size
        if size not in self._pieces:
            self._pieces[size] = TokenPieces(self.tok, size)  # special tokens by name
        return self._pieces[size]

    def _new_rows(self, batch: Batch, req: GenRequest) -> list[Row]:
        pieces = self._pieces_for(batch.model)
        rows = []
        for i, (prompt, p) in enumerate(zip(req.prompts, req.params, strict=True)):
            rows.append(Row(req, i, len(prompt), p, Utf8Stream(pieces, p.stop),
                            row_generator(p, batch.device)))
        return rows

    def _step(self, batch: Batch, new: list[GenRequest],
              outputs: list[tuple[GenRequest, list[Event]]]) -> None:
        # 1. drop rows whose client left
        if any(r.req.cancelled for r in batch.rows):
            batch.keep([i for i, r in enumerate(batch.rows) if not r.req.cancelled])
        # 2. prefill and merge newcomers
        new = [r for r in new if not r.cancelled]
        if new:
            rows = [row for req in new for row in self._new_rows(batch, req)]
            batch.admit(rows, [p for req in new for p in req.prompts])
        if not batch.rows:
            return
        # 3. sample every row's next token
        rows, dev = batch.rows, batch.device
        tokens = sample_step(batch.logits, [r.params for r in rows], [r.generator for r in rows])
        token_list = tokens.tolist()
        logprobs = self._logprobs(batch, tokens)
        # 4. text and events
        events: dict[int, list[Event]] = {}
        reqs: dict[int, GenRequest] = {}
        keep = []
        for i, (row, t) in enumerate(zip(rows, token_list, strict=True)):
            row.generated += 1
            self.tokens += 1
            entry = logprobs.get(i)
            if t in row.req.stop_ids:  # the end token is not part of the answer (nor logprobs)
                ev = Event(row.index, row.text.flush(), None, None, "stop")
            else:
                text = row.text.push(t)
                if row.text.stopped:
                    ev = Event(row.index, text, t, entry, "stop")
                elif (row.generated >= row.params.max_new
                      or row.prompt_len + row.generated >= batch.cfg.max_seq_len):
                    ev = Event(row.index, text + row.text.flush(), t, entry, "length")
                else:
                    ev = Event(row.index, text, t, entry)
                    keep.append(i)
            if ev.finish:
                row.req.finished += 1
            events.setdefault(row.req.id, []).append(ev)
            reqs[row.req.id] = row.req
        outputs.extend((reqs[k], evs) for k, evs in events.items())
        # 5. drop finished rows, feed the rest
        if len(keep) != len(rows):
            batch.keep(keep)
            tokens = tokens[torch.tensor(keep, device=dev)] if keep else tokens[:0]
        if batch.rows:
            batch.forward(tokens)

    def _logprobs(self, batch: Batch, tokens: Tensor) -> dict[int, dict]:
        want = [i for i, r in enumerate(batch.rows) if r.params.logprobs]
        if not want:
            return {}
        pieces = self._pieces_for(batch.model)
        idx = torch.tensor(want, device=batch.device)
        lp = batch.logits[idx].float().log_softmax(-1)
        chosen = lp.gather(1, tokens[idx][:, None])[:, 0].tolist()
        k = max(batch.rows[i].params.top_logprobs for i in want)
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (None, None)
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        out = {}
        tok_list = tokens[idx].tolist()
        for j, i in enumerate(want):
            entry = _entry(pieces, tok_list[j], chosen[j])
            n = batch.rows[i].params.top_logprobs
            entry["top_logprobs"] = [_entry(pieces, t, v) for t, v in
                                     zip(top_i[j][:n], top_v[j][:n], strict=True)] if n else []
            out[i] = entry
        return out

    def _fail(self, batch: Batch, new: list[GenRequest], message: str,
              outputs: list[tuple[GenRequest, list[Event]]]) -> None:
        """Finish every row of this batch (and its newcomers) with an error."""
        seen: dict[int, tuple[GenRequest, list[int]]] = {}
        for row in batch.rows:
            seen.setdefault(row.req.id, (row.req, []))[1].append(row.index)
        for req in new:  # every row of a newcomer, whether or not it was admitted yet
            seen[req.id] = (req, list(range(req.n)))
        for req, indices in seen.values():
            evs = [Event(i, "", finish="error", error=message) for i in indices]
            req.finished += len(evs)
            outputs.append((req, evs))
        batch.rows, batch.cache, batch.logits = [], None, None


def _entry(pieces: TokenPieces, i: int, logprob: float) -> dict:
    """A token's logprob entry, as OpenAI's API gives it."""
    return {"token": pieces.strings[i], "logprob": logprob, "bytes": pieces.byte_lists[i]}
