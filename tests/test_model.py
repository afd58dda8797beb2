import torch

from echolm.config import ModelConfig
from echolm.model import KVCache, Transformer
from echolm.settings import load_config


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      max_seq_len=64, **kw)
    m = Transformer(cfg)
    with torch.no_grad():  # zero-initialised projections would hide bugs: randomise all
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def test_param_count_worked_out_by_hand():
    m = Transformer(load_config("micro").model)
    # micro: vocab 512, d 64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU hidden 192
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 16 * 2 + 3 * 64 * 192 + 2 * 64
    assert m.num_params(non_embedding=True) == 2 * per_layer + 64
    assert m.num_params() == 2 * per_layer + 64 + 2 * 512 * 64


def test_initial_loss_is_ln_vocab():
    m = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    logits = m(torch.randint(0, 97, (2, 8)))
    assert torch.allclose(logits, torch.zeros_like(logits))  # zero head: uniform prediction


def test_causal_future_tokens_do_not_change_the_past():
    m = _model()
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    assert torch.allclose(m(x)[:, :8], m(y)[:, :8], atol=1e-5)
    assert not torch.allclose(m(x)[:, 8:], m(y)[:, 8:])


def test_kv_cache_matches_full_forward():
    for kw in ({}, {"qk_norm": False, "tie_embeddings": True}):
        m = _model(**kw)
        x = torch.randint(0, 97, (3, 20))
        full = m(x)
        cache = KVCache(m.cfg, 3, 32)
        parts = [m(x[:, :7], cache)]  # prefill, then a chunk, then single tokens
        parts.append(m(x[:, 7:10], cache))
        parts += [m(x[:, t:t + 1], cache) for t in range(10, 20)]
        assert torch.allclose(full, torch.cat(parts, 1), atol=1e-4)


def test_left_padding_gives_the_same_logits_as_no_padding():
    m = _model()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    cache = KVCache(m.cfg, 2, 32)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    valid = batch.new_ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    out = m(batch, cache, valid)
    assert torch.allclose(out[0], m(a)[0], atol=1e-4)
    assert torch.allclose(out[1, 4:], m(b)[0], atol=1e-4)
    # one decode step continues both rows correctly
    nxt = torch.tensor([[3], [4]])
    step = m(nxt, cache)
    assert torch.allclose(step[0, 0], m(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-4)
    assert torch.allclose(step[1, 0], m(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-4)
    assert not torch.isnan(out).any()


def test_shared_prompts_give_the_per_row_logprobs_and_gradients():
    """A GRPO group / DPO pair reads its prompt once (rollout.shared_prompts): the answers'
    log-probs and every parameter's gradient are those of reading each prompt + answer alone."""
    import random

    from echolm.rollout import pad_batch, shared_prompts, token_logprobs

    m = _model(qk_norm=False).train()
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(n)] for n in (3, 9, 6)]
    rows = [p for p in prompts for _ in range(3)] + [[5, 6, 7, 8]]  # one prompt alone
    answers = [[rng.randrange(97) for _ in range(rng.randint(2, 7))] for _ in rows]
    answers[1] = [11]  # a one-token answer (only the prompt's last position predicts it)
    x, y, mask = pad_batch(rows, answers, 0)
    split = shared_prompts(x, y, mask.bool())
    assert split is not None and split[0].shape == (4, 9)  # 4 distinct prompts, left-padded
    assert split[3].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]

    def per_row() -> torch.Tensor:  # the plain reading: every row's prompt + answer in full
        sel = mask.bool()
        logits = m.lm_head(m.hidden_states(x)[sel])
        lp = torch.log_softmax(logits, -1).gather(-1, y[sel][:, None]).squeeze(-1)
        return torch.zeros(x.shape).masked_scatter(sel, lp)

    weights = torch.linspace(0.5, 2.0, x.numel()).view(x.shape)  # distinct per position
    got = token_logprobs(m, x, y, mask)[0]
    (got * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    want = per_row()
    (want * weights).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert (got[mask.bool()] < 0).all() and (got[~mask.bool()] == 0).all()
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    # answers of one token each: only the prompts' last positions predict
    x1, y1, m1 = pad_batch(rows, [[a[0]] for a in answers], 0)
    one = token_logprobs(m, x1, y1, m1)[0]
    sel = m1.bool()
    plain = torch.log_softmax(m.lm_head(m.hidden_states(x1)[sel]), -1)
    assert torch.allclose(one[sel], plain.gather(-1, y1[sel][:, None])[:, 0], atol=1e-5)
    # no prompt shared, or targets that are not one run: the plain path
    assert shared_prompts(x[2:4], y[2:4], mask[2:4].bool()) is None
    holes = mask.bool().clone()
    holes[0, holes[0].nonzero()[1, 0]] = False
    assert shared_prompts(x, y, holes) is None



def test_bf16_training_attends_in_fp32_on_cpu():
    """Under bf16 (autocast or bf16 heads) with a backward to follow, attention runs in fp32:
    torch's CPU bf16 attention backward is ~2x slower. Passes without gradients (sampling, a
    reference) keep bf16, whose forward is the faster one."""
    import torch.nn.functional as F

    from echolm.model import attend_in_fp32

    q = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    assert attend_in_fp32(q)
    assert not attend_in_fp32(q.detach())  # nothing to differentiate
    with torch.no_grad():
        assert not attend_in_fp32(q)
    qf = torch.randn(1, 2, 3, 4, requires_grad=True)
    assert not attend_in_fp32(qf)  # fp32 training: nothing to change
    with torch.autocast("cpu", torch.bfloat16):
        assert attend_in_fp32(qf)  # autocast alone would run it in bf16

    m = _model(qk_norm=False)
    attn, T = m.layers[0].self_attn, 6
    cos, sin = (t[:T].to(torch.bfloat16) for t in (m.rope_cos, m.rope_sin))
    q, k, v = (torch.randn(2, h, T, 8, requires_grad=True) for h in (4, 2, 2))
    with torch.autocast("cpu", torch.bfloat16):
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))  # heads as autocast makes them
        got = attn.attend(qb, kb, vb, cos, sin, None, None)
        with torch.no_grad():
            sampled = attn.attend(qb, kb, vb, cos, sin, None, None)
    from echolm.model import apply_rope
    want = F.scaled_dot_product_attention(apply_rope(qb, cos, sin).float(),
                                          apply_rope(kb, cos, sin).float(), vb.float(),
                                          is_causal=True, enable_gqa=True)
    assert got.dtype == torch.float32 and torch.equal(got, want)  # o_proj casts it down
    assert sampled.dtype == torch.bfloat16
    got.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    heads = q.detach().to(torch.bfloat16).requires_grad_()  # pure bf16 (no autocast): bf16 out
    assert attn.attend(heads, kb.detach(), vb.detach(), cos, sin, None, None).dtype == \
        torch.bfloat16
