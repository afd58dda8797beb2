"""Token shards and the pretraining batch sampler: BOS-aligned row starts (worked out by hand),
batches that are a pure function of (seed, step), the data-parallel split, and the shard
files' round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import echolm.data.shards as shards
from echolm.data.shards import BatchSampler, load_tokens, row_starts, write_shards
from echolm.errors import EchoError
from echolm.tokenizer import Tokenizer

B = 0  # BOS id in the hand-made arrays


def arr(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, dtype=np.uint16)


# ---- row_starts ----------------------------------------------------------------------------
# A row is seq_len + 1 tokens [s, s + seq_len]. The next row starts at the last BOS in the
# row's final quarter [s + seq_len - seq_len // 4, s + seq_len] if there is one, else at
# s + seq_len (the last target becomes the next first input). With seq_len 4 the window is
# [s + 3, s + 4]. Rows that would run past the end are dropped.


def test_one_long_document() -> None:
    toks = arr(B, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)  # 13 tokens
    # rows [0..4] [4..8] [8..12]
    assert row_starts(toks, B, 4).tolist() == [0, 4, 8]
    # one token fewer: [8..12] no longer fits
    assert row_starts(toks[:-1], B, 4).tolist() == [0, 4]


def test_several_short_documents() -> None:
    #            0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    toks = arr(B, 1, 2, B, 3, B, 4, 5, 6, B, 7, 8, 9, 9, B, 1)
    # s=0: [3,4] holds 3 -> 3; s=3: [6,7] none -> 7 (the BOS at 5 is too early: it would
    # repeat most of the row); s=7: [10,11] none -> 11; s=11: 16 <= 16 fits, [14,15] holds
    # 14 -> 14; 14 + 5 > 16 stops
    assert row_starts(toks, B, 4).tolist() == [0, 3, 7, 11]


def test_many_documents_in_one_row_start_at_the_last() -> None:
    toks = arr(B, 1, B, 2, B, 3, 4, 5, 6, 7, 8)  # BOS at 0, 2, 4
    # seq_len 5: window [4,5] holds the BOS at 4 -> 4; s=4: [8,9] none -> 9
    assert row_starts(toks, B, 5).tolist() == [0, 4]


def test_bos_exactly_at_row_end() -> None:
    toks = arr(B, 1, 2, 3, B, 5, 6, 7, 8, 9)  # BOS at 4 = 0 + seq_len
    # s=0: [3,4] holds 4 -> 4; s=4: [7,8] none -> 8; 8 + 5 > 10 stops
    assert row_starts(toks, B, 4).tolist() == [0, 4]


def test_bos_just_past_row_end() -> None:
    toks = arr(B, 1, 2, 3, 4, B, 6, 7, 8, 9, 10)  # BOS at 5 = 0 + seq_len + 1
    # s=0: [3,4] none -> 4; s=4: [7,8] none -> 8 (5 is too early); 8 + 5 > 11 stops
    assert row_starts(toks, B, 4).tolist() == [0, 4]


def test_long_then_short_documents() -> None:
    toks = arr(B, 1, 2, 3, 4, 5, 6, 7, 8, 9, B, 1, 2, B, 1, 2, 3, 4)  # BOS at 0, 10, 13
    # 0 -> 4 -> 8 (no BOS in [3,4], [7,8]); s=8: [11,12] none -> 12; s=12: 17 <= 18 fits,
    # [15,16] none -> 16; 16 + 5 > 18 stops
    assert row_starts(toks, B, 4).tolist() == [0, 4, 8, 12]


def test_too_short_for_one_row() -> None:
    assert row_starts(arr(B, 1, 2, 3), B, 4).tolist() == []
    assert row_starts(arr(B, 1, 2, 3, 4), B, 4).tolist() == [0]


# ---- BatchSampler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """Documents of random length (2..40 tokens) with BOS first: ~2000 rows of 16 + 1."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(1500):
        n = int(rng.integers(2, 40))
        parts.append(np.concatenate([[B], rng.integers(1, 500, n)]))
    return np.concatenate(parts).astype(np.uint16)


def _rows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])


def test_batch_shapes_and_targets(tokens: np.ndarray) -> None:
    s = BatchSampler(tokens, B, 16, micro_batch=4, grad_accum=3, seed=1)
    mbs = s.micro_batches(0)
    assert len(mbs) == 3 and s.rows_per_step == 12
    for x, y in mbs:
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    starts = set(s.starts.tolist())
    for row in _rows(mbs):  # every row is a slice of the stream at a row start
        matches = [st for st in starts if np.array_equal(tokens[st: st + 17], row.numpy())]
        assert matches


def test_same_seed_and_step_same_batch(tokens: np.ndarray) -> None:
    a = BatchSampler(tokens, B, 16, 4, 2, seed=1)
    b = BatchSampler(tokens, B, 16, 4, 2, seed=1)
    b.micro_batches(500)  # a different epoch first: the cached permutation must not leak
    for step in (0, 3, 250, 3):
        assert torch.equal(_rows(a.micro_batches(step)), _rows(b.micro_batches(step)))
    assert not torch.equal(_rows(a.micro_batches(3)), _rows(a.micro_batches(4)))
    c = BatchSampler(tokens, B, 16, 4, 2, seed=2)
    assert not torch.equal(_rows(a.micro_batches(3)), _rows(c.micro_batches(3)))


def test_one_epoch_visits_every_row_once(tokens: np.ndarray) -> None:
    s = BatchSampler(tokens, B, 16, micro_batch=1, grad_accum=1, seed=3)
    n = len(s.starts)
    seen = [s._row_ids(i, 1)[0] for i in range(n)]
    assert sorted(seen) == list(range(n))
    assert s.epoch(n) == pytest.approx(1.0)
    # the next epoch is a different permutation of the same rows
    nxt = [s._row_ids(n + i, 1)[0] for i in range(n)]
    assert sorted(nxt) == list(range(n)) and nxt != seen


@pytest.mark.parametrize("micro", [1, 3])
def test_two_ranks_cover_one_rank_with_accumulation(tokens: np.ndarray, micro: int) -> None:
    one = BatchSampler(tokens, B, 16, micro, grad_accum=2, seed=5)
    r0 = BatchSampler(tokens, B, 16, micro, grad_accum=1, seed=5, rank=0, world_size=2)
    r1 = BatchSampler(tokens, B, 16, micro, grad_accum=1, seed=5, rank=1, world_size=2)
    assert one.rows_per_step == r0.rows_per_step == 2 * micro
    for step in (0, 1, 7, 400):
        m0, m1 = one.micro_batches(step)
        (a,), (b,) = r0.micro_batches(step), r1.micro_batches(step)
        # the same rows, split the same way: rank k's batch is accumulation step k's
        assert torch.equal(_rows([a]), _rows([m0]))
        assert torch.equal(_rows([b]), _rows([m1]))
        assert not torch.equal(_rows([a]), _rows([b]))


def test_too_little_data(tokens: np.ndarray) -> None:
    with pytest.raises(EchoError, match="fewer than one step needs"):
        BatchSampler(tokens[:200], B, 16, micro_batch=8, grad_accum=4, seed=0)


# ---- write_shards / load_tokens -------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(prepared_run: Path) -> Tokenizer:
    return Tokenizer.load(prepared_run / "tokenizer")


DOCS = ["Hello world.", "A second document, a little longer than the first one.",
        "Ünïcödé — and emoji 🙂 too!", "x", "Numbers 12345 and <|bos|> as plain text."]


def test_write_and_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    meta = write_shards(iter(DOCS), tok, tmp_path, "train", progress=False)
    ids = load_tokens(tmp_path, "train")
    want = [t for d in DOCS for t in [tok.bos, *tok.encode(d)]]
    assert ids.dtype == np.uint16
    assert ids.tolist() == want
    assert meta == {"docs": len(DOCS), "tokens": len(want),
                    "bytes": sum(len(d.encode()) for d in DOCS), "shards": 1}
    assert list(tmp_path.glob("*.tmp")) == []
    # each document decodes back from its span
    bos_pos = np.flatnonzero(ids == tok.bos).tolist() + [len(ids)]
    assert len(bos_pos) == len(DOCS) + 1
    for d, a, b in zip(DOCS, bos_pos, bos_pos[1:], strict=False):
        assert tok.decode(ids[a + 1: b].tolist()) == d


def test_many_shards_load_in_order(tok: Tokenizer, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "SHARD_TOKENS", 500)  # a new shard every 256-document batch
    docs = [f"document number {i}: {DOCS[i % len(DOCS)]}" for i in range(700)]
    meta = write_shards(docs, tok, tmp_path, "val", progress=False)
    assert meta["shards"] == 3 and len(list(tmp_path.glob("val_*.npy"))) == 3
    want = [t for d in docs for t in [tok.bos, *tok.encode(d)]]
    assert load_tokens(tmp_path, "val").tolist() == want
    assert meta["tokens"] == len(want)


def test_no_documents_and_no_shards(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(EchoError, match="no train documents"):
        write_shards(iter([]), tok, tmp_path, "train", progress=False)
    with pytest.raises(EchoError, match="no val token shards"):
        load_tokens(tmp_path, "val")


def test_tokens_are_encoded_again_for_a_retrained_tokenizer(run_dir: Path, corpus: Path) -> None:
    """tokens/ remembers the tokenizer and data it was encoded from: the same ones reuse it,
    a retrained tokenizer (`tokenizer --force`) gets its own ids, not the old one's."""
    from conftest import data_overrides

    from echolm.pipeline import resolve_run_config
    from echolm.settings import load_config
    from echolm.train.pretrain import prepare_tokens
    from echolm.train.tokenize import run_tokenizer

    cfg = resolve_run_config(run_dir, None, [])
    folder = run_dir / "tokens"
    shard = sorted(folder.glob("train_*.npy"))[0]
    before = shard.read_bytes()
    messages: list[str] = []
    prepare_tokens(cfg, run_dir, Tokenizer.load(run_dir / "tokenizer"), log=messages.append)
    assert messages == [] and shard.read_bytes() == before  # reused as it was
    cfg = load_config("micro", [*data_overrides(corpus), "tokenizer.vocab_size=300"])
    run_tokenizer(cfg, run_dir, force=True, log=messages.append)
    tok = Tokenizer.load(run_dir / "tokenizer")
    prepare_tokens(cfg, run_dir, tok, log=messages.append)
    assert any("encoding again" in m for m in messages)
    ids = load_tokens(folder, "train")
    assert tok.vocab_size == 300 and int(ids.max()) < 300 and shard.read_bytes() != before
    assert not list(run_dir.glob(".tokens*"))  # nothing left beside it
