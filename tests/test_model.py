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
