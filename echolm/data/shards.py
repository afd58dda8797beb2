"""Token shards on disk and the pretraining batch sampler.

Documents are encoded (each starting with <|bos|>) into `.npy` arrays read back with memmap,
so the corpus never has to fit in memory twice. Training rows are BOS-aligned: a row starts
at a document's first token whenever a document begins in the last quarter of the previous
row, else it continues where the previous row ended (a long document). Their order is a permutation
drawn from the seed per epoch, so the batch at any step is a pure function of (seed, step):
that is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from echolm.atomic import atomic_path, atomic_write_json
from echolm.errors import EchoError
from echolm.tokenizer import Tokenizer

SHARD_TOKENS = 50_000_000


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def write_shards(docs: Iterable[str], tok: Tokenizer, out: Path, split: str,
                 threads: int = 2, progress: bool = True) -> dict:
    """Encode documents into `out/{split}_NNN.npy`; returns counts (docs, tokens, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    buf: list[np.ndarray] = []
    n_buf = n_docs = n_tokens = n_bytes = shard = 0
    batch: list[str] = []
    bar = tqdm(desc=f"encode {split}", unit="B", unit_scale=True, disable=not progress)

    def flush_batch() -> None:
        nonlocal n_buf, n_tokens
        for ids in tok.encode_batch(batch, threads=threads):
            arr = np.empty(len(ids) + 1, dtype=dtype)
            arr[0] = tok.bos
            arr[1:] = ids
            buf.append(arr)
            n_buf += len(arr)
            n_tokens += len(arr)
        batch.clear()

    def flush_shard() -> None:
        nonlocal shard, n_buf
        if buf:
            _write_npy(out / f"{split}_{shard:03d}.npy", np.concatenate(buf))
            buf.clear()
            n_buf, shard = 0, shard + 1

    for doc in docs:
        batch.append(doc)
        n_docs += 1
        size = len(doc.encode("utf-8"))
        n_bytes += size
        bar.update(size)
        if len(batch) >= 256:
            flush_batch()
            if n_buf >= SHARD_TOKENS:
                flush_shard()
    flush_batch()
    flush_shard()
    bar.close()
    if n_docs == 0:
        raise EchoError(f"no {split} documents found in the data sources")
    return {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes, "shards": shard}


def load_tokens(folder: Path, split: str) -> np.ndarray:
    files = sorted(folder.glob(f"{split}_*.npy"))
    if not files:
        raise EchoError(f"{folder}: no {split} token shards (run the tokenize step first)")
    arrays = []
    for f in files:
        try:
            arrays.append(np.load(f, mmap_mode="r"))
        except (OSError, ValueError, EOFError) as e:  # cut, or not a .npy file
            raise EchoError(f"{f}: unreadable token shard ({e}); delete {folder} to encode "
                            "the text again") from None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def row_starts(tokens: np.ndarray, bos: int, seq_len: int) -> np.ndarray:
    """Start offsets of training rows of seq_len + 1 tokens (see module docstring).

    After a row starting at s, the next starts at the last document start (BOS) in the
    row's final quarter [s + seq_len - seq_len // 4, s + seq_len] if there is one, else at
    s + seq_len. The window bounds the tokens two rows share to a quarter of a row.
    """
    bos_pos = np.flatnonzero(np.asarray(tokens) == bos)
    starts, s, n = [], 0, len(tokens)
    while s + seq_len + 1 <= n:
        starts.append(s)
        lo = max(s + 1, s + seq_len - seq_len // 4)
        j = np.searchsorted(bos_pos, s + seq_len, side="right") - 1  # last BOS <= s + seq_len
        s = int(bos_pos[j]) if j >= 0 and bos_pos[j] >= lo else s + seq_len
    return np.asarray(starts, dtype=np.int64)


class BatchSampler:
    """Rows for global step `step`: world_size * grad_accum * micro_batch rows per step, each
    rank taking its own micro-batches. One process with 2 accumulation steps sees exactly the
    rows that 2 processes with 1 step each see together. `pin_memory` (GPUs): batches in
    page-locked memory, so that `.to(device, non_blocking=True)` copies asynchronously."""

    def __init__(self, tokens: np.ndarray, bos: int, seq_len: int, micro_batch: int,
                 grad_accum: int, seed: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> None:
        self.tokens, self.seq_len, self.pin_memory = tokens, seq_len, pin_memory
        self.starts = row_starts(tokens, bos, seq_len)
        self.micro, self.accum, self.seed = micro_batch, grad_accum, seed
        self.rank, self.world = rank, world_size
        self.rows_per_step = micro_batch * grad_accum * world_size
        if len(self.starts) < self.rows_per_step:
            raise EchoError(f"training data has {len(self.starts)} rows of {seq_len + 1} tokens, "
                            f"fewer than one step needs ({self.rows_per_step}); "
                            "add data or lower seq_len / micro_batch")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _row_ids(self, first: int, count: int) -> np.ndarray:
        n = len(self.starts)
        out = []
        for g in range(first, first + count):
            epoch, k = divmod(g, n)
            if epoch != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(self._perm[k])
        return np.asarray(out)

    def epoch(self, step: int) -> float:
        return step * self.rows_per_step / len(self.starts)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's grad_accum (inputs, targets) pairs for optimizer step `step`."""
        out = []
        for a in range(self.accum):
            # micro-batch order: accumulation index outer, rank inner, so that
            # world=2/accum=1 and world=1/accum=2 split the same rows the same way
            index = (step * self.accum + a) * self.world + self.rank
            ids = self._row_ids(index * self.micro, self.micro)
            rows = np.stack([self.tokens[s: s + self.seq_len + 1] for s in self.starts[ids]])
            t = torch.from_numpy(rows.astype(np.int64))
            if self.pin_memory:
                t = t.pin_memory()
            out.append((t[:, :-1], t[:, 1:]))
        return out


def write_meta(folder: Path, meta: dict) -> None:
    atomic_write_json(folder / "meta.json", meta)
