"""Seconds per GRPO training step: Echo's GRPO stage (``echolm.train.grpo``) vs TRL's
``GRPOTrainer`` on the same model, prompts, group size, completion length and reward; full
fine-tuning, and with ``--lora R`` also LoRA on both sides.

Model (``bench/policy_model.py``): by default the 7M shape (hidden 256, 4 layers, 4 heads / 2
KV heads, vocab 8192, untied), random weights; with ``--gguf FILE`` (or ``--run DIR``)
SmolLM2-135M-Instruct, imported by ``echolm import gguf`` and exported by ``echolm export hf``
for the peer, so both sides start from the same fp32 weights. Prompts are random token ids;
the peer's tokenizer is word-level ("w17" <-> id 17 over the model's vocabulary), so both
sides see the same prompt ids (no hub access: ``HF_HUB_OFFLINE=1``).

One step = one optimizer update from fresh samples: 8 prompts (SmolLM2: 2; 16-32 random
tokens each) x a group of 8 (SmolLM2: 4) sampled completions of exactly 32 tokens
(temperature 1, no top-k/top-p; Echo: the stop ids are ids outside the vocabulary, so nothing
stops early; TRL: ``min_new_tokens = max_new_tokens = 32``), scoring, group-relative
advantages (mean / std within each group), one forward/backward of the clipped policy loss
over all sequences (token-averaged, clip 0.2 / 0.28, no KL on either side, one iteration, so
the old log-probs are the detached current ones), gradient clipping 1.0, optimizer step.
Echo's step is what ``run_rl`` does per step with ``dynamic_sampling=False`` and
``epochs = minibatches = 1``: ``start_lora`` (LoRA only), ``sample_responses`` (the engine),
``group_advantages``, ``pad_batch``, ``policy_loss`` (``clipped_policy_loss``) through
``Trainer.update``. The peer: ``trl.GRPOTrainer`` with generation by ``transformers``
``generate`` (no vLLM), ``num_generations`` = the group, ``per_device_train_batch_size`` =
prompts x group, ``loss_type = "dapo"`` (token-averaged), ``epsilon = 0.2``,
``epsilon_high = 0.28``, ``beta = 0``, LoRA through ``peft_config``; its other defaults kept,
among them ``gradient_checkpointing=True`` (less activation memory, a second forward in the
backward).

Reward, the same function on both sides, on the completion's token ids: 1.0 if the
completion holds an even number of even token ids, else 0.0 (cheap, deterministic, and
not constant within a group, so advantages are not all zero).

Optimizers: Echo's is ``--ours-optimizer``: by default Muon (hidden matrices) + AdamW for the
7M (Echo's config default) and AdamW for SmolLM2 (what `echolm rl` uses under its default
preset, cpu); TRL's AdamW. With LoRA both train the adapters with AdamW. ``--ours-adamw``
adds Echo with AdamW for everything.

Dtype: ``--dtype auto`` by default, the smollm2-cpu preset's: bf16 autocast on both sides where
the CPU multiplies bf16 natively (AMX, AVX512-BF16; TRL's ``bf16=True``, TRL 1.16's own
config default unless fp16 is set), fp32 elsewhere (an AVX2 CPU). ``--dtype fp32`` /
``--dtype bf16`` force one. Echo's stage samples in fp32 whatever its training dtype, and
weighs each token by truncated importance sampling against the sampler's log-probs (as
``echolm rl`` does; TRL's GRPOTrainer does that only with vLLM, not here).

Each side runs in its own subprocess (``--side``), one torch thread by default (the machine
may be shared); rounds alternate the order. Within a child: ``--warmup`` untimed steps, then
``--steps`` timed ones, timed from the end of one step to the end of the next (median).
The result is the median over rounds.

    python bench/grpo_step.py                        # 7M: 2 rounds, 2 + 6 steps per side
    python bench/grpo_step.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --lora 16  # 6 min, 2 cores
    python bench/grpo_step.py --side echo --profile  # where Echo's step time goes

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    alternating_rounds,
    current_rss_mb,
    emit_json,
    kernel_cache,
    median,
    pair_figures,
    peak_rss_mb,
    peer_kernel_caches,
    print_modes,
    require_peer,
)
from policy_model import (  # noqa: E402
    add_model_args,
    child_model_argv,
    describe,
    echo_lora_fields,
    echo_model,
    hf_model,
    hf_tokenizer,
    peft_config,
    prepared,
    resolve_args,
    side_or_compare,
    special_ids,
    train_dtype,
    trainable_params,
    vocab_size,
)

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def make_prompts(n: int, seed: int, vocab: int) -> list[list[int]]:
    pad, _ = special_ids(vocab)
    rng = random.Random(seed)
    return [[rng.randrange(pad) for _ in range(rng.randint(16, 32))] for _ in range(n)]


def reward_ids(ids: list[int]) -> float:
    """The shared reward: 1.0 if the completion holds an even number of even token ids."""
    return 1.0 if sum(1 for t in ids if t % 2 == 0) % 2 == 0 else 0.0


# ---- one side, in its own process ----------------------------------------------------------

def echo_side(args: argparse.Namespace) -> dict[str, Any]:
    from echolm.config import RLConfig
    from echolm.lora import start_lora
    from echolm.losses import group_advantages
    from echolm.rollout import pad_batch, pad_logprobs, sample_responses
    from echolm.runtime import Dist
    from echolm.train.grpo import PolicyBatch, policy_loss
    from echolm.trainer import Trainer

    model = echo_model(args)
    vocab = model.cfg.vocab_size
    prompts = make_prompts(args.prompts, args.seed + 1, vocab)
    # stop ids outside the vocabulary: never sampled, so every response is max_tokens long
    tok = SimpleNamespace(stop_ids=[vocab + 1], pad=special_ids(vocab)[0])
    g = RLConfig(prompts_per_step=args.batch, group_size=args.group, max_tokens=args.tokens,
                 temperature=1.0, scale_by_std=True, aggregation="token", clip_low=CLIP_LOW,
                 clip_high=CLIP_HIGH, kl_beta=0.0, epochs=1, minibatches=1,
                 dynamic_sampling=False, max_steps=10**6, warmup_steps=0, warmdown_frac=0.0,
                 dtype=train_dtype(args), grad_clip=1.0,
                 optimizer="adamw" if args.side == "echo_adamw" else args.ours_optimizer,
                 **echo_lora_fields(args.lora))
    tcfg = g
    start_lora(model, g, "rl", log=lambda _m: None)  # as the stage (nothing when lora_rank = 0)
    rss_model = current_rss_mb()
    tmp = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    trainer = Trainer(model, tcfg, tmp, "rl", tmp, Dist())
    stats: dict[str, float] = {}
    info: dict[str, Any] = {"lengths": set(), "reward_mean": []}

    def one_step(step: int) -> None:
        start = (step * args.batch) % len(prompts)
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(args.batch)]
        sampled = sample_responses(trainer.model, tok, batch_prompts, g.group_size,
                                   g.max_tokens, g.temperature, seed=args.seed * 97 + step,
                                   logprobs=True)  # as the stage: truncated importance sampling
        rewards = torch.tensor([reward_ids(s.ids) for s in sampled]).view(args.batch, g.group_size)
        adv = group_advantages(rewards, g.scale_by_std).flatten()
        flat_prompts = [p for p in batch_prompts for _ in range(g.group_size)]
        x, y, mask = pad_batch(flat_prompts, [s.ids for s in sampled], tok.pad)
        batch = PolicyBatch(x, y, mask, adv, pad_logprobs(mask, [s.logprobs for s in sampled]),
                            None, None)
        idx = torch.arange(len(sampled))
        trainer.update([(batch, idx)], lambda m, item: policy_loss(m, item, g, stats),
                     int(mask.sum()))
        info["lengths"].update(len(s.ids) for s in sampled)
        info["reward_mean"].append(float(rewards.mean()))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for s in range(args.warmup):
            one_step(s)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(args.warmup)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    times, last = [], time.perf_counter()
    for s in range(args.warmup + args.steps):
        one_step(s)
        now = time.perf_counter()
        if s >= args.warmup:
            times.append(now - last)
        last = now
    return {"side": args.side, "step_s": median(times), "steps_s": times,
            "completion_lengths": sorted(info["lengths"]),
            "trainable_params": trainable_params(trainer.model),
            "reward_mean": round(sum(info["reward_mean"]) / len(info["reward_mean"]), 4),
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "onednn_kernel_cache": kernel_cache()}


def trl_side(args: argparse.Namespace) -> dict[str, Any]:
    peer_kernel_caches()  # as TRL's users run it
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    vocab = vocab_size(args)
    prompts = make_prompts(args.prompts, args.seed + 1, vocab)
    ds = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in p) for p in prompts]})
    tok = hf_tokenizer(vocab)
    if tok(ds[0]["prompt"], add_special_tokens=False)["input_ids"] != prompts[0]:
        raise SystemExit("trl: tokenisation differs from Echo's ids")
    model = hf_model(args)
    rss_model = current_rss_mb()
    info: dict[str, Any] = {"lengths": set(), "reward_mean": []}

    def parity_reward(prompts, completions, completion_ids, **_kw):
        out = [reward_ids(list(ids)) for ids in completion_ids]
        info["lengths"].update(len(ids) for ids in completion_ids)
        info["reward_mean"].append(sum(out) / len(out))
        return out

    out = tempfile.mkdtemp(prefix="bench_trl_grpo_")
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch * args.group,
                     gradient_accumulation_steps=1, num_generations=args.group,
                     max_completion_length=args.tokens,
                     generation_kwargs={"min_new_tokens": args.tokens},
                     temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
                     beta=0.0, num_iterations=1, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
                     loss_type="dapo", scale_rewards="group",
                     max_steps=args.warmup + args.steps, learning_rate=1e-5,
                     max_grad_norm=1.0, report_to="none", save_strategy="no",
                     logging_strategy="no", log_completions=False, use_cpu=True,
                     bf16=train_dtype(args) == "bf16",
                     fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=parity_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=peft_config(args.lora))
    setup_s = time.perf_counter() - t0
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            ends.append(time.perf_counter())

        def on_step_end(self, *_a, **_k):
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    else:
        trainer.train()
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    times = steps[args.warmup:]
    return {"side": "trl", "step_s": median(times), "steps_s": times, "setup_s": setup_s,
            "completion_lengths": sorted(info["lengths"]),
            "trainable_params": trainable_params(trainer.model),
            "reward_mean": round(sum(info["reward_mean"]) / max(len(info["reward_mean"]), 1), 4),
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "onednn_kernel_cache": kernel_cache()}


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    return trl_side(args) if args.side == "trl" else echo_side(args)


# ---- the comparison (parent) ---------------------------------------------------------------

def child_argv(args: argparse.Namespace, key: str) -> list[str]:
    side, _, mode = key.partition("+")
    argv = [__file__, "--side", side]
    for name in ("batch", "group", "tokens", "prompts", "warmup", "steps", "threads", "seed",
                 "ours_optimizer"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + child_model_argv(args, args.lora if mode == "lora" else 0)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    require_peer("transformers", "trl", *(["peft"] if args.lora else []))
    import transformers
    import trl

    full = [] if args.lora_only else (["echo", "trl"]
                                      + (["echo_adamw"] if args.ours_adamw else []))
    keys = full + (["echo+lora", "trl+lora"] if args.lora else [])
    with prepared(args):
        res = alternating_rounds(keys, args.rounds, lambda k: child_argv(args, k),
                                 lambda r: f"  lengths {r['completion_lengths']}")
        model = describe(args)
    modes = {}
    if full:
        modes["full"] = pair_figures(res["echo"], res["trl"])
    if args.lora:
        modes[f"lora r{args.lora}"] = pair_figures(res["echo+lora"], res["trl+lora"])
    print_modes(modes)
    head = next(iter(modes.values()))
    last_echo, last_peer = (res[k][-1] for k in (keys[0], keys[1]))
    detail: dict[str, Any] = {
        **{k: head[k] for k in ("rounds_ours", "rounds_peer", "peak_rss_mb_ours",
                                "peak_rss_mb_peer", "rss_ratio")},
        "mode": next(iter(modes)), "modes": modes,
        "steps_ours_last_round": [round(v, 4) for v in last_echo["steps_s"]],
        "steps_peer_last_round": [round(v, 4) for v in last_peer["steps_s"]],
        "trainable_params": {k: res[k][-1]["trainable_params"] for k in keys},
        "completion_lengths_ours": last_echo["completion_lengths"],
        "completion_lengths_peer": last_peer["completion_lengths"],
        "reward_mean_ours": last_echo["reward_mean"],
        "reward_mean_peer": last_peer["reward_mean"],
        "peer_setup_s": round(last_peer["setup_s"], 3),
        "prompts_per_step": args.batch, "group_size": args.group,
        "completion_tokens": args.tokens, "prompt_tokens": "16-32", "dtype": train_dtype(args),
        "kl_beta": 0.0, "clip": [CLIP_LOW, CLIP_HIGH], "aggregation": "token (dapo)",
        "reward": "1.0 if the completion holds an even number of even token ids, else 0.0",
        "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
        "threads": last_echo["threads"], "model": model,
        "lora": ({"rank": args.lora, "alpha": 2 * args.lora, "dropout": 0.0,
                  "targets": "q,k,v,o,gate,up,down"} if args.lora else None),
        "optimizers": {"ours": {"muon": "Muon (hidden matrices) + AdamW",
                                "adamw": "AdamW"}[args.ours_optimizer], "peer": "AdamW"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "peer": "trl.GRPOTrainer(transformers LlamaForCausalLM sdpa, transformers generate, "
                "no vLLM; LoRA: peft_config)",
    }
    if "echo_adamw" in res:
        adamw = median([r["step_s"] for r in res["echo_adamw"]])
        detail.update(ours_adamw=round(adamw, 4), ratio_ours_adamw=round(adamw / head["peer"], 3),
                      peak_rss_mb_ours_adamw=round(max(r["peak_rss_mb"]
                                                       for r in res["echo_adamw"]), 1))
    return {"bench": "grpo_step", "ours": head["ours"], "peer": head["peer"],
            "ratio": head["ratio"], "unit": "s/step", "detail": detail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="prompts per step (default 8; "
                   "SmolLM2: 2)")
    p.add_argument("--group", type=int, default=None,
                   help="samples per prompt (default 8; SmolLM2: 4)")
    p.add_argument("--tokens", type=int, default=32, help="completion tokens (exactly)")
    p.add_argument("--prompts", type=int, default=64, help="prompts in the dataset")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 2; SmolLM2: 3: Echo's heap "
                   "takes ~4 steps to settle, echolm/runtime.py)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps, median (default 6; SmolLM2: 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (default 1; 0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    add_model_args(p)
    p.add_argument("--ours-adamw", action="store_true",
                   help="also time Echo with AdamW instead of Muon + AdamW")
    p.add_argument("--side", choices=["echo", "echo_adamw", "trl"],
                   help="run one side only (child mode)")
    p.add_argument("--profile", action="store_true", help="with --side: torch.profiler table")
    args = p.parse_args()
    resolve_args(p, args, {"batch": (8, 2), "group": (8, 4), "warmup": (2, 3),
                           "steps": (6, 3)})
    emit_json(side_or_compare(args, run_side, compare))


if __name__ == "__main__":
    main()
