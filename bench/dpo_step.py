"""Seconds per DPO training step: Echo's DPO stage (``echolm.train.dpo``) vs TRL's
``DPOTrainer`` on the same model, data and batch; full fine-tuning, and with ``--lora R`` also
LoRA on both sides.

Model (``bench/policy_model.py``): by default the 7M shape (hidden 256, 4 layers, 4 heads / 2
KV heads, vocab 8192, untied), random weights; with ``--gguf FILE`` (or ``--run DIR``)
SmolLM2-135M-Instruct, imported by ``echolm import gguf`` and exported by ``echolm export hf``
for the peer, so both sides start from the same fp32 weights. Data: the same synthetic pairs
on both sides: a prompt of 24-40 random token ids and two answers of 40-86 (plus an end
token), so a prompt + answer is at most 127 tokens and nothing is truncated at ``max_length =
128``. The peer's tokenizer is word-level ("w17" <-> id 17 over the model's vocabulary), so
both sides see the same token sequences (no hub access: ``HF_HUB_OFFLINE=1``).

One step = one optimizer update on 8 pairs (SmolLM2: 2; chosen and rejected in one forward),
loss sigmoid DPO, beta 0.1, gradient clipping 1.0. Timed from the end of one step to the end
of the next, so batch assembly (collation), logging and everything else a step does is
included. Excluded, as one-off setup: building the models and TRL's dataset tokenisation.
Both Echo (as `echolm dpo` does) and TRL by default (``precompute_ref_log_probs=False``) run
the reference forward pass (no gradients) in EVERY step, on that step's pairs only: in full
fine-tuning on a second, frozen copy of the model; with LoRA on the policy with its adapters
disabled (no copy: Echo's ``lora.frozen_reference``, TRL's default with ``peft_config``).
``--peer-precompute`` adds a side: TRL with ``precompute_ref_log_probs=True`` (its reference
pass happens once, over every pair, in setup). TRL keeps its defaults otherwise, among them
``gradient_checkpointing=True`` (less activation memory, a second forward in the backward).

Optimizers: Echo's is ``--ours-optimizer``: by default Muon (hidden matrices) + AdamW for the
7M (Echo's config default) and AdamW for SmolLM2 (what `echolm dpo` uses under its default
preset, cpu; Muon's Newton-Schulz costs ~1.5 TFLOP per step for a 135M model, more than the
forward and backward of a small batch); TRL's AdamW. With LoRA both train the adapters with
AdamW. ``--ours-adamw`` adds Echo with AdamW for everything (``dpo.optimizer = "adamw"``).

Dtype: ``--dtype auto`` by default, the smollm2-cpu preset's: bf16 autocast on both sides where
the CPU multiplies bf16 natively (AMX, AVX512-BF16; TRL's ``bf16=True``, TRL 1.16's own
config default unless fp16 is set), fp32 elsewhere (an AVX2 CPU). ``--dtype fp32`` /
``--dtype bf16`` force one.

Threads: 1 by default. On a small machine shared with other jobs, 2 threads make every
parallel op wait for the other core (small matmuls, such as Muon's Newton-Schulz iterations,
become many times slower, and the slowdown depends on the neighbours' load), which measures
the neighbours more than the code; ``--threads 2`` (or 0, torch's default) is there for a
quiet machine.

Each side runs in its own subprocess (``--side echo|trl|trl_pre``, ``--lora R`` for its LoRA
run), so its peak RSS is its own; rounds alternate the order of the sides. Within a child:
``--warmup`` untimed steps, then ``--steps`` timed ones (median). The result is the median
over rounds; peak RSS is the highest over rounds. Per mode (full, lora) it prints both
sides' step time and peak RSS and the ratios; the JSON's top level is the first mode's.

    python bench/dpo_step.py                        # 7M: 2 rounds, 3 + 10 steps per side
    python bench/dpo_step.py --rounds 1 --steps 5 --peer-precompute --ours-adamw
    python bench/dpo_step.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --lora 16  # 4 min, 2 cores
    python bench/dpo_step.py --side echo --profile  # where Echo's step time goes

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
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

SEQ_LEN = 128


def make_pairs(n: int, seed: int, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids; answers WITHOUT the end token (each side adds it:
    TRL appends eos to the text, Echo's data has it as the answer's last token)."""
    pad, _ = special_ids(vocab)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(pad) for _ in range(rng.randint(24, 40))]
        c = [rng.randrange(pad) for _ in range(rng.randint(40, 86))]
        r = [rng.randrange(pad) for _ in range(rng.randint(40, 86))]
        out.append((p, c, r))
    return out


# ---- one side, in its own process ----------------------------------------------------------

def echo_side(args: argparse.Namespace) -> dict[str, Any]:
    from echolm.config import DPOConfig
    from echolm.lora import frozen_reference, start_lora
    from echolm.rankings import step_indices
    from echolm.runtime import Dist, resolve_dtype
    from echolm.train.dpo import EncodedPair, dpo_batch_loss, make_pair_batch, reference_logps
    from echolm.trainer import Trainer

    model = echo_model(args)
    vocab = model.cfg.vocab_size
    pad, eos = special_ids(vocab)
    data = make_pairs(args.pairs, args.seed + 1, vocab)
    enc = [EncodedPair(p + c + [eos], p + r + [eos], len(p), len(p)) for p, c, r in data]
    tcfg = DPOConfig(seq_len=SEQ_LEN, micro_batch=args.batch, max_steps=10**6, warmup_steps=0,
                     warmdown_frac=0.0, dtype=train_dtype(args), grad_clip=1.0, beta=0.1,
                     loss="sigmoid",
                     optimizer="adamw" if args.side == "echo_adamw" else args.ours_optimizer,
                     **echo_lora_fields(args.lora))
    # as the stage: LoRA adapters when lora_rank > 0, then the reference (a frozen copy; with
    # LoRA the policy's base, adapters off)
    start_lora(model, tcfg, "dpo", log=lambda _m: None)
    reference = frozen_reference(model, resolve_dtype(tcfg.dtype, torch.device("cpu")))
    rss_model = current_rss_mb()
    pref = tcfg
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    trainer = Trainer(model, tcfg, tmp, "dpo", tmp, Dist())
    stats: dict[str, float] = {}

    def loss_fn(_m, b):
        return dpo_batch_loss(trainer.model, b, reference_logps(reference, b), pref, stats)

    def one_step(step: int) -> None:
        idx = step_indices(len(enc), args.batch, step, 0)
        batch = make_pair_batch(enc, idx, pad)
        trainer.update([batch], loss_fn, int(batch.mask.sum()))

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
            "pairs": len(enc), "trainable_params": trainable_params(trainer.model),
            "reward_acc_last": stats.get("reward_acc"),
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "onednn_kernel_cache": kernel_cache()}


def trl_side(args: argparse.Namespace, precompute: bool) -> dict[str, Any]:
    import copy

    peer_kernel_caches()  # as TRL's users run it
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    def words(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    vocab = vocab_size(args)
    _, eos = special_ids(vocab)
    data = make_pairs(args.pairs, args.seed + 1, vocab)
    ds = Dataset.from_dict({"prompt": [words(p) for p, _, _ in data],
                            "chosen": [" " + words(c) for _, c, _ in data],
                            "rejected": [" " + words(r) for _, _, r in data]})
    tok = hf_tokenizer(vocab)
    model = hf_model(args)
    # full: a frozen copy, what TRL loads by default; LoRA: none (the adapter-disabled model)
    ref_model = None if precompute or args.lora else copy.deepcopy(model)
    rss_model = current_rss_mb()
    out = tempfile.mkdtemp(prefix="bench_trl_")
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_length=SEQ_LEN,
                    max_steps=args.warmup + args.steps, beta=0.1, loss_type=["sigmoid"],
                    learning_rate=1e-5, max_grad_norm=1.0, report_to="none",
                    save_strategy="no", logging_steps=1, use_cpu=True,
                    bf16=train_dtype(args) == "bf16", fp16=False,
                    dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
                    precompute_ref_log_probs=precompute, gradient_accumulation_steps=1)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds,
                         processing_class=tok, peft_config=peft_config(args.lora))
    setup_s = time.perf_counter() - t0
    # the same token sequences as Echo's (first pair: prompt + chosen + eos)
    first = trainer.train_dataset[0]
    p, c, _ = data[0]
    if first["prompt_ids"] != p or first["chosen_ids"] != c + [eos]:
        raise SystemExit("trl: tokenisation differs from Echo's ids")

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
    return {"side": "trl_pre" if precompute else "trl", "step_s": median(times),
            "steps_s": times, "setup_s": setup_s, "pairs": len(ds),
            "ref_model_in_memory": trainer.ref_model is not None,
            "trainable_params": trainable_params(trainer.model),
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "onednn_kernel_cache": kernel_cache()}


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side in ("echo", "echo_adamw"):
        return echo_side(args)
    return trl_side(args, precompute=args.side == "trl_pre")


# ---- the comparison (parent) ---------------------------------------------------------------

def child_argv(args: argparse.Namespace, key: str) -> list[str]:
    side, _, mode = key.partition("+")
    argv = [__file__, "--side", side]
    for name in ("batch", "pairs", "warmup", "steps", "threads", "seed",
                 "ours_optimizer"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + child_model_argv(args, args.lora if mode == "lora" else 0)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    require_peer("transformers", "trl", *(["peft"] if args.lora else []))
    import transformers
    import trl

    full = [] if args.lora_only else (
        ["echo", "trl"] + (["trl_pre"] if args.peer_precompute else [])
        + (["echo_adamw"] if args.ours_adamw else []))
    keys = full + (["echo+lora", "trl+lora"] if args.lora else [])
    with prepared(args):
        res = alternating_rounds(keys, args.rounds, lambda k: child_argv(args, k))
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
        "trainable_params": {k: res[k][-1]["trainable_params"] for k in keys},
        "ours_recomputes_ref_each_step": True, "peer_recomputes_ref_each_step": True,
        "peer_ref_model_in_memory": last_peer["ref_model_in_memory"],
        "batch_pairs": args.batch, "max_length": SEQ_LEN, "dtype": train_dtype(args),
        "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
        "dataset_pairs": args.pairs, "threads": last_echo["threads"], "model": model,
        "lora": ({"rank": args.lora, "alpha": 2 * args.lora, "dropout": 0.0,
                  "targets": "q,k,v,o,gate,up,down", "reference": "adapters disabled"}
                 if args.lora else None),
        "optimizers": {"ours": {"muon": "Muon (hidden matrices) + AdamW",
                                "adamw": "AdamW"}[args.ours_optimizer], "peer": "AdamW"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "peer": "trl.DPOTrainer(transformers LlamaForCausalLM sdpa; full: ref_model = a frozen "
                "copy; LoRA: peft_config, ref = adapters disabled)",
    }
    ours = median([r["step_s"] for r in res[keys[0]]])
    if "trl_pre" in res:
        pre = median([r["step_s"] for r in res["trl_pre"]])
        detail.update(peer_precompute=round(pre, 4), ratio_vs_peer_precompute=round(ours / pre, 3),
                      peak_rss_mb_peer_precompute=round(max(r["peak_rss_mb"]
                                                            for r in res["trl_pre"]), 1))
    if "echo_adamw" in res:
        adamw = median([r["step_s"] for r in res["echo_adamw"]])
        detail.update(ours_adamw=round(adamw, 4), ratio_ours_adamw=round(adamw / head["peer"], 3),
                      peak_rss_mb_ours_adamw=round(max(r["peak_rss_mb"]
                                                       for r in res["echo_adamw"]), 1))
    return {"bench": "dpo_step", "ours": head["ours"], "peer": head["peer"],
            "ratio": head["ratio"], "unit": "s/step", "detail": detail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None,
                   help="preference pairs per step (default 8; SmolLM2: 2)")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs in the dataset (default 256; SmolLM2: 64)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3; SmolLM2: 3: Echo's heap "
                   "takes ~4 steps to settle, echolm/runtime.py)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps, median (default 10; SmolLM2: 3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (default 1, see above; 0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    add_model_args(p)
    p.add_argument("--peer-precompute", action="store_true",
                   help="also time TRL with precompute_ref_log_probs=True")
    p.add_argument("--ours-adamw", action="store_true",
                   help="also time Echo with AdamW instead of Muon + AdamW")
    p.add_argument("--side", choices=["echo", "echo_adamw", "trl", "trl_pre"],
                   help="run one side only (child mode)")
    p.add_argument("--profile", action="store_true", help="with --side: torch.profiler table")
    args = p.parse_args()
    resolve_args(p, args, {"batch": (8, 2), "pairs": (256, 64), "warmup": (3, 3),
                           "steps": (10, 3)})
    emit_json(side_or_compare(args, run_side, compare))


if __name__ == "__main__":
    main()
