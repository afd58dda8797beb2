"""Greedy decode speed: Echo's engine (``echolm.engine.generate_ids``) vs Hugging Face
``generate`` on the same weights.

Peer: ``transformers.LlamaForCausalLM`` (attn_implementation="sdpa") with
``generate(do_sample=False, use_cache=True)``. Same shape (hidden, layers, heads, KV heads,
SwiGLU width = Echo's ``d_mlp``, vocab, RoPE theta, RMSNorm eps, untied embeddings), fp32.
Echo runs without QK-norm (Llama has none) so the two models are the same function: the peer
gets Echo's weights (HF names = Echo's names with a ``model.`` prefix, except ``lm_head``), and
the parent checks that both sides generate the same first tokens.

Both sides produce exactly ``--new-tokens`` tokens per row after a ``--prompt-len`` prompt
(no end-of-sequence stop: Echo gets no stop ids, HF gets ``eos_token_id=None`` and
``min_new_tokens = max_new_tokens``). A timed run is one whole generation call (prefill and
decode); tok/s counts every row: batch x new tokens / seconds.

Each (side, shape, batch) runs in its own subprocess (``--side echo|hf``) so its peak RSS is
its own; rounds alternate the order of the sides. Within a child: one untimed warm-up
generation (reported as "first call": for Echo it includes packing the weights for the decode
kernels, see ``echolm.engine.FastDecoder``), then ``--repeats`` timed ones (median); the result
is the median over rounds. Besides wall-clock tok/s, tok/s of the process's CPU time is
reported too: on a shared machine it is far less disturbed by other jobs. One torch thread
per side by default (``--threads``).

    python bench/decode_speed.py                           # both shapes, batch 1 and 8
    python bench/decode_speed.py --shapes 7M --batches 1 --rounds 1
    python bench/decode_speed.py --side echo --shape 7M --batch 1 --profile   # where time goes

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from common import current_rss_mb, emit_json, llama_config, median, peak_rss_mb, run_json_child

from echolm.config import ModelConfig

SHAPES = {  # name: (hidden, layers, heads, kv_heads, vocab)
    "7M": (256, 4, 4, 2, 8192),
    "100M": (768, 12, 12, 4, 32768),
}


def model_config(shape: str, max_seq_len: int) -> ModelConfig:
    hidden, layers, heads, kv_heads, vocab = SHAPES[shape]
    return ModelConfig(vocab_size=vocab, n_layer=layers, n_embd=hidden, n_head=heads,
                       n_kv_head=kv_heads, max_seq_len=max_seq_len, qk_norm=False)


def echo_model(args: argparse.Namespace):
    """Echo's model with every weight random (Echo zero-inits o_proj/down_proj/lm_head, which
    would make every logit equal): matrices ~ U(+-sqrt(3/fan_in)), embeddings ~ N(0, 1)."""
    from echolm.model import Transformer

    torch.manual_seed(args.seed)
    model = Transformer(model_config(args.shape, args.prompt_len + args.new_tokens))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                bound = math.sqrt(3.0 / p.shape[1])
                p.uniform_(-bound, bound)
    return model.eval()


def prompts(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = SHAPES[args.shape][4]
    return torch.randint(vocab, (args.batch, args.prompt_len), generator=g)


# ---- one side, in its own process ----------------------------------------------------------

def echo_generator(args: argparse.Namespace):
    from echolm.engine import SamplingParams, generate_ids

    model = echo_model(args)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    rows = prompts(args).tolist()

    def run() -> torch.Tensor:
        steps = list(generate_ids(model, rows, params))
        return torch.stack(steps, 1)

    return model, run


def hf_generator(args: argparse.Namespace):
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    echo = echo_model(args)
    c = echo.cfg
    cfg = llama_config(c)
    # built on the meta device, then handed Echo's tensors (assign=True, no copy): the process
    # never holds two models, so its peak RSS is that of one HF model
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    state = {("" if k == "lm_head.weight" else "model.") + k: v
             for k, v in echo.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise SystemExit(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)  # its buffers were meta
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise SystemExit(f"still on the meta device: {meta}")
    del echo, state
    model.eval()
    gen_cfg = GenerationConfig(do_sample=False, use_cache=True, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, eos_token_id=None,
                               pad_token_id=0, bos_token_id=None)
    ids = prompts(args)
    mask = torch.ones_like(ids)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        return out[:, ids.shape[1]:]

    return model, run


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_start = current_rss_mb()
    model, run = (echo_generator if args.side == "echo" else hf_generator)(args)
    rss_model = current_rss_mb()
    t0 = time.perf_counter()
    tokens = run()  # warm-up (thread pool, kernel selection, lazy imports; Echo packs weights)
    first_s = time.perf_counter() - t0
    if tuple(tokens.shape) != (args.batch, args.new_tokens):
        raise SystemExit(f"{args.side}: generated {tuple(tokens.shape)}, expected "
                         f"{(args.batch, args.new_tokens)}")
    times, cpu_times = [], []
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                        row_limit=args.profile_rows))
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    n = args.batch * args.new_tokens
    return {
        "side": args.side, "shape": args.shape, "batch": args.batch,
        "tok_s_median": n / median(times), "run_s": times, "first_run_s": first_s,
        "cpu_tok_s_median": n / median(cpu_times),
        "tokens": tokens.tolist(),
        "params": sum(p.numel() for p in model.parameters()),
        "rss_after_import_mb": rss_start, "rss_after_model_mb": rss_model,
        "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
    }


# ---- the comparison (parent) ---------------------------------------------------------------

def child_argv(args: argparse.Namespace, side: str, shape: str, batch: int) -> list[str]:
    argv = [__file__, "--side", side, "--shape", shape, "--batch", str(batch)]
    for name in ("prompt_len", "new_tokens", "repeats", "threads", "seed"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def agreed_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """How many leading steps all rows of a and b agree on."""
    n = len(a[0])
    for ra, rb in zip(a, b, strict=True):
        same = (i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y)
        n = min(n, next(same, len(ra)))
    return n


def compare(args: argparse.Namespace) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    threads = 0
    rss: dict[str, list[float]] = {"echo": [], "hf": []}
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            key = f"{shape}_b{batch}"
            rates: dict[str, list[float]] = {"echo": [], "hf": []}
            cpu_rates: dict[str, list[float]] = {"echo": [], "hf": []}
            last: dict[str, dict[str, Any]] = {}
            for r in range(args.rounds):
                for side in (("echo", "hf") if r % 2 == 0 else ("hf", "echo")):
                    res = run_json_child(child_argv(args, side, shape, batch))
                    rates[side].append(res["tok_s_median"])
                    cpu_rates[side].append(res["cpu_tok_s_median"])
                    rss[side].append(res["peak_rss_mb"])
                    last[side] = res
                    print(f"{key:9s} round {r + 1}/{args.rounds} {side:4s}: "
                          f"{res['tok_s_median']:9,.1f} tok/s (CPU time: "
                          f"{res['cpu_tok_s_median']:9,.1f})  first call "
                          f"{res['first_run_s']:6.2f}s  peak RSS {res['peak_rss_mb']:.0f} MiB",
                          flush=True)
            threads = last["echo"]["threads"]
            agree = agreed_prefix(last["echo"]["tokens"], last["hf"]["tokens"])
            if agree < args.check_tokens:
                raise SystemExit(f"{key}: Echo and HF disagree within the first "
                                 f"{args.check_tokens} tokens (agree on {agree}):\n"
                                 f"echo {last['echo']['tokens'][0][:16]}\n"
                                 f"hf   {last['hf']['tokens'][0][:16]}")
            ours, peer = median(rates["echo"]), median(rates["hf"])
            ours_cpu, peer_cpu = median(cpu_rates["echo"]), median(cpu_rates["hf"])
            detail[key] = {
                "ours": round(ours, 1), "peer": round(peer, 1), "ratio": round(ours / peer, 3),
                "rounds_ours": [round(v, 1) for v in rates["echo"]],
                "rounds_peer": [round(v, 1) for v in rates["hf"]],
                "cpu_time_ours": round(ours_cpu, 1), "cpu_time_peer": round(peer_cpu, 1),
                "cpu_time_ratio": round(ours_cpu / peer_cpu, 3),
                "first_call_s_ours": round(last["echo"]["first_run_s"], 3),
                "first_call_s_peer": round(last["hf"]["first_run_s"], 3),
                "agreed_tokens": agree,
                "params": last["echo"]["params"],
                "peak_rss_mb_ours": round(last["echo"]["peak_rss_mb"], 1),
                "peak_rss_mb_peer": round(last["hf"]["peak_rss_mb"], 1),
            }
            print(f"{key:9s} echo {ours:9,.1f} tok/s  hf {peer:9,.1f} tok/s  ratio "
                  f"{ours / peer:5.2f}  (same greedy tokens for the first {agree} of "
                  f"{args.new_tokens})", flush=True)
    detail["peak_rss_mb_ours"] = round(max(rss["echo"]), 1)
    detail["peak_rss_mb_peer"] = round(max(rss["hf"]), 1)
    detail.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype="fp32",
                  rounds=args.rounds, repeats=args.repeats, threads=threads,
                  peer="transformers LlamaForCausalLM sdpa generate(do_sample=False)")
    head = detail.get("7M_b1") or next(v for v in detail.values() if isinstance(v, dict))
    return {"bench": "decode_speed", "ours": head["ours"], "peer": head["peer"],
            "ratio": head["ratio"], "unit": "tok/s", "detail": detail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="7M,100M", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per child")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    p.add_argument("--check-tokens", type=int, default=8,
                   help="the first N greedy tokens must agree between the sides")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (0: torch default). 1 by default: on a small "
                        "shared machine a second OpenMP thread makes both sides several times "
                        "slower whenever another job holds a core")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--side", choices=["echo", "hf"], help="run one side only (child mode)")
    p.add_argument("--shape", choices=list(SHAPES), default="7M", help="child mode")
    p.add_argument("--batch", type=int, default=1, help="child mode")
    p.add_argument("--profile", action="store_true", help="with --side: torch.profiler table")
    p.add_argument("--profile-rows", type=int, default=30)
    args = p.parse_args()
    emit_json(run_side(args) if args.side else compare(args))


if __name__ == "__main__":
    main()
