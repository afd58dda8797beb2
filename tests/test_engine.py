import gc
import math
import weakref

import pytest
import torch

from echolm.config import ModelConfig
from echolm.engine import (
    FastDecoder,
    SamplingParams,
    Utf8Stream,
    filter_logits,
    generate,
    generate_ids,
    penalize_repeats,
    sample_next,
)
from echolm.model import KVCache, Transformer
from echolm.tokenizer import train_tokenizer

PROMPTS = [[5, 17, 3, 88, 42, 9, 61], [12, 7], [30, 31, 32, 33],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second OpenMP thread only adds waiting, and on a busy machine that
    waiting makes these tests 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      max_seq_len=64, **kw)
    m = Transformer(cfg)
    with torch.no_grad():  # zero-initialised projections would hide bugs: randomise all
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


@torch.no_grad()
def _greedy_no_cache(m: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: the full forward pass over the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def _steps(m: Transformer, prompts: list[list[int]], p: SamplingParams, **kw) -> list[list[int]]:
    """Rows of the tokens generate_ids yielded (-1 = row finished)."""
    return torch.stack(list(generate_ids(m, prompts, p, **kw)), 1).tolist()


GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": False, "tie_embeddings": True},
                                {"attention_bias": True}])
@pytest.mark.parametrize("fast", [True, False])
def test_greedy_with_cache_equals_full_recompute_left_padded_batch(kw, fast):
    m = _model(**kw)
    want = [_greedy_no_cache(m, x, 20) for x in PROMPTS]
    assert len({len(x) for x in PROMPTS}) == len(PROMPTS)  # different lengths: left padding
    assert _steps(m, PROMPTS, GREEDY, fast=fast) == want
    for x, w in zip(PROMPTS, want, strict=True):  # batch of one (another weight layout)
        assert _steps(m, [x], GREEDY, fast=fast) == [w]


@pytest.mark.parametrize("fast", [True, False])
def test_repeated_prompts_are_read_once_and_answered_alike(fast):
    """A group of identical prompts (GRPO, pass@k) is prefilled once and its cache rows
    copied: greedy answers equal the full recompute; sampled rows still differ."""
    m = _model()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    want = [_greedy_no_cache(m, x, 20) for x in prompts]
    assert _steps(m, prompts, GREEDY, fast=fast) == want
    sampled = _steps(m, [PROMPTS[0]] * 6, SamplingParams(max_tokens=12, temperature=1.0,
                                                          seed=3), fast=fast)
    assert len({tuple(r) for r in sampled}) > 1


def test_fast_decoder_logits_match_the_model():
    m = _model()
    prompt = torch.tensor(PROMPTS[0])[None].repeat(3, 1)
    for batch in (1, 3):
        ref_cache, cache = KVCache(m.cfg, batch, 16), KVCache(m.cfg, batch, 16)
        with torch.inference_mode():
            m(prompt[:batch], ref_cache), m(prompt[:batch], cache)
            dec = FastDecoder(m, batch)
            for t in (4, 50, 96):
                tok = torch.full((batch,), t)
                assert torch.allclose(dec(tok, cache), m(tok[:, None], ref_cache)[:, 0],
                                      atol=1e-4)
        assert cache.len == ref_cache.len == len(PROMPTS[0]) + 3


def test_fast_decoder_is_rebuilt_when_the_weights_change():
    m = _model()
    assert _steps(m, PROMPTS[:2], GREEDY) == [_greedy_no_cache(m, x, 20) for x in PROMPTS[:2]]
    dec = FastDecoder.get(m, 2)
    assert FastDecoder.get(m, 2) is dec  # unchanged weights: reused
    with torch.no_grad():  # e.g. an optimizer step between two samplings
        m.layers[0].mlp.up_proj.weight.mul_(-1.5)
        m.lm_head.weight.add_(0.1)
    assert FastDecoder.get(m, 2) is not dec
    assert _steps(m, PROMPTS[:2], GREEDY) == [_greedy_no_cache(m, x, 20) for x in PROMPTS[:2]]
    ref = weakref.ref(m)
    del m, dec
    gc.collect()
    assert ref() is None  # the decoder cache does not keep a model alive


def test_an_update_frees_the_decoder_copies_before_its_forward(tmp_path):
    """RL samples, then updates: the decoder's weight copies (a whole model's size) are stale
    from the update on, so they are gone before its forward/backward, not kept through it."""
    from echolm.config import RLConfig
    from echolm.runtime import Dist
    from echolm.trainer import Trainer

    m = _model()
    trainer = Trainer(m, RLConfig(optimizer="adamw", warmup_steps=0), tmp_path, "rl", tmp_path,
                      Dist())
    _steps(m, PROMPTS[:2], GREEDY)
    dec = weakref.ref(FastDecoder._last[m])
    seen = []

    def loss_fn(model, x):
        seen.append(m in FastDecoder._last)  # during the update's forward
        return model(x, targets=x)

    trainer.update([torch.tensor([PROMPTS[2]])], loss_fn, 4)
    gc.collect()
    assert seen == [False] and dec() is None
    # and sampling after the update reads the updated weights
    assert _steps(m, PROMPTS[:2], GREEDY) == [_greedy_no_cache(m, x, 20) for x in PROMPTS[:2]]


def test_stop_token_finishes_rows_at_different_times():
    m = _model()
    full = [_greedy_no_cache(m, x, 20) for x in PROMPTS]
    stop = full[0][3]  # row 0 stops at step 3; the others at their first `stop`, if any
    finish = [row.index(stop) if stop in row else None for row in full]
    assert len(set(finish)) > 1
    p = SamplingParams(max_tokens=20, temperature=0.0, stop_ids=(stop,))
    rows = _steps(m, PROMPTS, p)
    n_steps = 20 if None in finish else max(finish) + 1  # ends once every row has stopped
    for row, ref, f in zip(rows, full, finish, strict=True):
        assert len(row) == n_steps
        if f is None:
            assert row == ref
        else:  # the stop token is yielded, then -1 for as long as the others run
            assert row[:f + 1] == ref[:f + 1]
            assert row[f + 1:] == [-1] * (n_steps - f - 1)

    class Tok:
        pad = 0

    outs = generate(m, Tok(), PROMPTS, p)  # completed ids: the stop token excluded
    for out, ref, f in zip(outs, full, finish, strict=True):
        assert out == (ref if f is None else ref[:f])


@pytest.mark.parametrize("fast", [True, False])
def test_finished_rows_leave_the_batch_and_the_others_go_on_unchanged(fast):
    """Once half the rows still computed have stopped, they are dropped (cache rows too):
    every row's tokens stay those of its own greedy decoding, and the decoder ends up built
    for fewer rows."""
    m = _model()
    prompts = [[i % 97, (7 * i) % 97, (3 * i + 1) % 97][: 1 + i % 3] for i in range(1, 13)]
    full = [_greedy_no_cache(m, x, 24) for x in prompts]
    counts: dict[int, int] = {}
    for row in full:
        for t in row[:12]:
            counts[t] = counts.get(t, 0) + 1
    # the two commonest early tokens stop rows at many different steps
    stops = sorted(counts, key=counts.get)[-2:]
    finish = [min((row.index(s) for s in stops if s in row), default=None) for row in full]
    assert len(set(finish)) > 3 and sum(f is not None for f in finish) > len(prompts) // 2
    p = SamplingParams(max_tokens=24, temperature=0.0, stop_ids=tuple(stops))
    for row, ref, f in zip(_steps(m, prompts, p, fast=fast), full, finish, strict=True):
        assert row[:len(ref) if f is None else f + 1] == (ref if f is None else ref[:f + 1])
        assert set(row[(len(ref) if f is None else f + 1):]) <= {-1}
    if fast:
        assert FastDecoder._last[m].batch < len(prompts)  # the batch shrank


def test_max_tokens_and_max_seq_len():
    m = _model()  # max_seq_len 64
    assert [len(r) for r in _steps(m, PROMPTS, SamplingParams(max_tokens=5, temperature=0))] \
        == [5] * len(PROMPTS)
    long = list(range(1, 61))  # 60 tokens: room for 4 more
    rows = _steps(m, [long, [3, 4]], SamplingParams(max_tokens=100, temperature=0))
    assert [len(r) for r in rows] == [4, 4]
    assert rows[0] == _greedy_no_cache(m, long, 4)
    with pytest.raises(ValueError, match="no room"):
        next(generate_ids(m, [list(range(64))], GREEDY))


def test_sampling_same_seed_same_tokens():
    m = _model()
    p = SamplingParams(max_tokens=30, temperature=1.0, seed=123)
    a, b = _steps(m, PROMPTS, p), _steps(m, PROMPTS, p)
    assert a == b
    assert _steps(m, PROMPTS, SamplingParams(max_tokens=30, temperature=1.0, seed=7)) != a
    assert a != _steps(m, PROMPTS, GREEDY)  # really sampled


def test_greedy_equivalents():
    m = _model()
    want = _steps(m, PROMPTS, GREEDY)
    for p in (SamplingParams(max_tokens=20, temperature=1.0, top_k=1, seed=1),
              SamplingParams(max_tokens=20, temperature=0.7, top_p=1e-6, seed=2),
              SamplingParams(max_tokens=20, temperature=1.0, top_p=0.0, seed=3)):
        assert _steps(m, PROMPTS, p) == want
    logits = torch.randn(5, 97)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def _kept(logits: list[float], **kw) -> list[int]:
    out = filter_logits(torch.tensor([logits]), SamplingParams(**kw))[0]
    return torch.isfinite(out).nonzero()[:, 0].tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(x) for x in probs]
    assert _kept(logits, top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8 exactly
    assert _kept(logits, top_p=0.6) == [0, 1]
    assert _kept(logits, top_p=0.81) == [0, 1, 2]
    assert _kept(logits, top_p=0.4) == [0]
    assert _kept(logits, top_p=1.0) == [0, 1, 2, 3]
    shuffled = [logits[i] + 2.5 for i in (2, 0, 3, 1)]  # order and shift do not matter
    assert _kept(shuffled, top_p=0.8) == [1, 3]
    # the kept probabilities are renormalised: 0.5 / 0.8 and 0.3 / 0.8
    kept = filter_logits(torch.tensor([logits]), SamplingParams(top_p=0.8)).softmax(-1)[0]
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(torch.tensor([logits] * 64), SamplingParams(top_p=0.8), None,
                             g)[i]) for i in range(64)}
    assert draws == {0, 1}
    assert _kept([2.0, 1.0, 0.5, 0.0, -1.0], top_k=2) == [0, 1]


def test_engine_and_server_batcher_sample_alike_at_the_nucleus_edge():
    """The server's batcher samples with the engine's sampler: for the same logits and seed,
    a row of the batcher (beside rows with other settings) draws the token `sample_next`
    draws. Here the nucleus boundary is hit exactly: 0.6 + 0.25 reaches top_p = 0.85, and in
    float32 the mass before the third token is 0.84999996, a hair short. The batcher's own
    sampler (no 1e-6 slack) used to keep that 0.15 token and draw it; its seeded answers
    also changed because it drew by inverting the CDF at one uniform number, where both now
    call torch.multinomial."""
    from echolm.serve.batcher import RowParams, row_generator, sample_step

    logits = torch.tensor([math.log(x) for x in (0.6, 0.25, 0.15)])
    before = logits.softmax(-1).cumsum(-1)[1]
    assert before < 0.85 and float(before) > 0.85 - 1e-6  # the edge: short by float rounding
    engine_p = SamplingParams(top_p=0.85)
    rows = [RowParams(max_new=1, temperature=0.0),  # other rows: other settings
            RowParams(max_new=1, top_p=0.85, seed=0),
            RowParams(max_new=1, temperature=0.5, top_k=2)]
    batch = torch.stack([logits.roll(1), logits, logits.flip(0)])
    draws = set()
    for seed in range(200):
        rows[1].seed = seed
        gens = [row_generator(p, "cpu") for p in rows]
        server = int(sample_step(batch, rows, gens)[1])
        engine = int(sample_next(logits[None], engine_p, None,
                                 torch.Generator().manual_seed(seed))[0])
        assert server == engine
        draws.add(engine)
    assert draws == {0, 1}  # the 0.15 token is outside the nucleus


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    history = torch.tensor([[0, 1, 1]])  # a token seen twice is penalised once
    out = penalize_repeats(logits, history, 2.0)
    assert torch.equal(out, torch.tensor([[1.5, -2.0, 2.0, 0.5]]))  # + divided, - multiplied
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert int(sample_next(logits, greedy, history)) == 2
    assert int(sample_next(logits, SamplingParams(temperature=0.0), history)) == 0


def test_repetition_penalty_ignores_left_padding():
    m = _model()
    p = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.5)
    batch = _steps(m, PROMPTS, p, pad_id=0)  # token 0 is not in any prompt
    alone = [_steps(m, [x], p)[0] for x in PROMPTS]
    assert batch == alone


def test_utf8_stream_never_emits_half_a_character():
    text = ("Café crème, naïve façade — 日本語のテキスト, 中文字符 😀🎉👍 "
            "emoji 🚀 and Ünïcödé ✓ ") * 3
    tok = train_tokenizer([text, "plain ascii words here and there " * 20], vocab_size=300)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    partial = [i for i in ids if _invalid_utf8(tok.token_bytes[i])]
    assert partial, "no token splits a character: the test would prove nothing"
    stream = Utf8Stream(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    for piece in pieces:
        piece.encode("utf-8")  # whole characters only (a lone surrogate would raise)
    assert "".join(pieces) == text
    # a special token in between adds no text and does not disturb a pending character
    stream = Utf8Stream(tok)
    k = ids.index(partial[0]) + 1
    mixed = ids[:k] + [tok.pad] + ids[k:]
    assert "".join(stream.push(i) for i in mixed) + stream.flush() == text


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    from echolm.engine import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(50_000, 1)
    got = draw(probs, torch.Generator().manual_seed(0)).view(50_000, 2)
    freq = torch.bincount(got[:, 0], minlength=4) / 50_000
    # binomial standard error at p=0.6, n=50k: 0.0022; 5 of them
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.011)
    assert freq[1] == 0 and (got[:, 1] == 3).all()
    again = draw(probs, torch.Generator().manual_seed(0)).view(50_000, 2)
    assert torch.equal(got, again)  # a seeded generator: the same draws
