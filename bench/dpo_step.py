"""Seconds per DPO training step: Echo's DPO stage (``echolm.train.dpo``) vs TRL's
``DPOTrainer`` on the same model shape, data and batch.

Model: the 7M shape (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 8192, SwiGLU width =
Echo's ``d_mlp``, untied embeddings, no QK-norm), fp32, the same random weights on both sides
(the peer is ``transformers.LlamaForCausalLM`` with Echo's weights copied in). Data: the same
synthetic pairs on both sides: a prompt of 24-40 tokens and two answers of 40-86 tokens (plus
an end token), so a prompt + answer is at most 127 tokens and nothing is truncated at
``max_length = 128``. The peer's tokenizer is a ``PreTrainedTokenizerFast`` over a word-level
vocabulary ("w0".."w8189", "<pad>", "</s>") whose text maps 1:1 to the ids Echo is given, so
both sides see the same token sequences (no hub access: ``HF_HUB_OFFLINE=1``).

One step = one optimizer update on 8 pairs (16 sequences, chosen and rejected in one
forward), loss sigmoid DPO, beta 0.1, gradient clipping 1.0. Timed from the end of one step to
the end of the next, so batch assembly (collation), logging and everything else a step does
is included. Excluded, as one-off setup: building the models and TRL's dataset tokenisation.
Both Echo (as `echolm dpo` does) and TRL by default (``precompute_ref_log_probs=False``) keep
a second, frozen copy of the model and run the reference forward pass (no gradients) in
EVERY step, on that step's pairs only. ``--peer-precompute`` adds a third side: TRL with
``precompute_ref_log_probs=True`` (its reference pass happens once, over every pair, in
setup).
Optimizers are each side's own defaults for this job: Echo's Muon (hidden matrices) + AdamW
(embedding, head, norms); TRL's AdamW. ``--ours-adamw`` adds Echo with AdamW for everything
(``dpo.optimizer = "adamw"``), the same optimizer family as the peer.

Threads: 1 by default. On a small machine shared with other jobs, 2 threads make every
parallel op wait for the other core (small matmuls, such as Muon's Newton-Schulz iterations,
become many times slower, and the slowdown depends on the neighbours' load), which measures
the neighbours more than the code; ``--threads 2`` (or 0, torch's default) is there for a
quiet machine.

Each side runs in its own subprocess (``--side echo|trl|trl_pre``), so its peak RSS is its
own; rounds alternate the order of the sides. Within a child: ``--warmup`` untimed steps,
then ``--steps`` timed ones (median). The result is the median over rounds.

    python bench/dpo_step.py                        # 2 rounds, 3 + 10 steps per side
    python bench/dpo_step.py --rounds 1 --steps 5 --peer-precompute --ours-adamw
    python bench/dpo_step.py --side echo --profile  # where Echo's step time goes

The last line of stdout is one JSON object (see ``emit_json``).
"""

from __future__ import annotations

import argparse
import math
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
    current_rss_mb,
    emit_json,
    llama_config,
    median,
    peak_rss_mb,
    require_peer,
    run_json_child,
)

from echolm.config import ModelConfig  # noqa: E402

VOCAB = 8192
PAD_ID, EOS_ID = VOCAB - 2, VOCAB - 1  # the peer tokenizer's "<pad>" and "</s>"


def model_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layer=4, n_embd=256, n_head=4, n_kv_head=2,
                       max_seq_len=128, qk_norm=False)


def echo_model(seed: int):
    """Echo's model with every weight random (fresh Echo models zero o_proj/down_proj/lm_head)."""
    from echolm.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(model_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                p.uniform_(-math.sqrt(3.0 / p.shape[1]), math.sqrt(3.0 / p.shape[1]))
    return model


def make_pairs(n: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids; answers WITHOUT the end token (each side adds it:
    TRL appends eos to the text, Echo's data has it as the answer's last token)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(PAD_ID) for _ in range(rng.randint(24, 40))]
        c = [rng.randrange(PAD_ID) for _ in range(rng.randint(40, 86))]
        r = [rng.randrange(PAD_ID) for _ in range(rng.randint(40, 86))]
        out.append((p, c, r))
    return out


# ---- one side, in its own process ----------------------------------------------------------

def echo_side(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    from echolm.config import DPOConfig
    from echolm.rankings import step_indices
    from echolm.runtime import Dist
    from echolm.train.dpo import EncodedPair, dpo_batch_loss, make_pair_batch, reference_logps
    from echolm.trainer import Trainer

    model = echo_model(args.seed)
    data = make_pairs(args.pairs, args.seed + 1)
    enc = [EncodedPair(p + c + [EOS_ID], p + r + [EOS_ID], len(p), len(p)) for p, c, r in data]
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # frozen, as the stage's
    rss_model = current_rss_mb()
    tcfg = DPOConfig(seq_len=128, micro_batch=args.batch, max_steps=10**6, warmup_steps=0,
                     warmdown_frac=0.0, dtype="fp32", grad_clip=1.0, beta=0.1, loss="sigmoid",
                     optimizer="adamw" if args.side == "echo_adamw" else "muon")
    pref = tcfg
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    trainer = Trainer(model, tcfg, tmp, "dpo", tmp, Dist())
    stats: dict[str, float] = {}

    def loss_fn(_m, b):
        return dpo_batch_loss(trainer.model, b, reference_logps(reference, b), pref, stats)

    def one_step(step: int) -> None:
        idx = step_indices(len(enc), args.batch, step, 0)
        batch = make_pair_batch(enc, idx, PAD_ID)
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
            "pairs": len(enc),
            "reward_acc_last": stats.get("reward_acc"),
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def hf_model(seed: int):
    from transformers import LlamaForCausalLM

    echo = echo_model(seed)
    c = echo.cfg
    cfg = llama_config(c, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    state = {("" if k == "lm_head.weight" else "model.") + k: v
             for k, v in echo.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise SystemExit(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    return model


def hf_tokenizer():
    """Word-level: "w17" <-> id 17, so text written from ids tokenizes back to those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(PAD_ID)}
    vocab["<pad>"], vocab["</s>"] = PAD_ID, EOS_ID
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


def trl_side(args: argparse.Namespace, precompute: bool) -> dict[str, Any]:
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    def words(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    data = make_pairs(args.pairs, args.seed + 1)
    ds = Dataset.from_dict({"prompt": [words(p) for p, _, _ in data],
                            "chosen": [" " + words(c) for _, c, _ in data],
                            "rejected": [" " + words(r) for _, _, r in data]})
    tok = hf_tokenizer()
    model = hf_model(args.seed)
    ref_model = None if precompute else copy.deepcopy(model)  # what TRL loads by default
    rss_model = current_rss_mb()
    out = tempfile.mkdtemp(prefix="bench_trl_")
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_length=128,
                    max_steps=args.warmup + args.steps, beta=0.1, loss_type=["sigmoid"],
                    learning_rate=1e-5, max_grad_norm=1.0, report_to="none",
                    save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False,
                    dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
                    precompute_ref_log_probs=precompute, gradient_accumulation_steps=1)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds,
                         processing_class=tok)
    setup_s = time.perf_counter() - t0
    # the same token sequences as Echo's (first pair: prompt + chosen + eos)
    first = trainer.train_dataset[0]
    p, c, _ = data[0]
    if first["prompt_ids"] != p or first["chosen_ids"] != c + [EOS_ID]:
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
            "rss_after_model_mb": rss_model, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side in ("echo", "echo_adamw"):
        return echo_side(args)
    return trl_side(args, precompute=args.side == "trl_pre")


# ---- the comparison (parent) ---------------------------------------------------------------

def child_argv(args: argparse.Namespace, side: str) -> list[str]:
    argv = [__file__, "--side", side]
    for name in ("batch", "pairs", "warmup", "steps", "threads", "seed"):
        argv += [f"--{name}", str(getattr(args, name))]
    return argv


def compare(args: argparse.Namespace) -> dict[str, Any]:
    require_peer("transformers", "trl")
    import transformers
    import trl

    sides = (["echo", "trl"] + (["trl_pre"] if args.peer_precompute else [])
             + (["echo_adamw"] if args.ours_adamw else []))
    step_s: dict[str, list[float]] = {s: [] for s in sides}
    rss: dict[str, list[float]] = {s: [] for s in sides}
    last: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            res = run_json_child(child_argv(args, side))
            step_s[side].append(res["step_s"])
            rss[side].append(res["peak_rss_mb"])
            last[side] = res
            print(f"round {r + 1}/{args.rounds} {side:10s}: {res['step_s']:.4f} s/step  peak RSS "
                  f"{res['peak_rss_mb']:.0f} MiB", flush=True)
    ours, peer = median(step_s["echo"]), median(step_s["trl"])
    detail: dict[str, Any] = {
        "rounds_ours": [round(v, 4) for v in step_s["echo"]],
        "rounds_peer": [round(v, 4) for v in step_s["trl"]],
        "peak_rss_mb_ours": round(max(rss["echo"]), 1),
        "peak_rss_mb_peer": round(max(rss["trl"]), 1),
        "ours_recomputes_ref_each_step": True, "peer_recomputes_ref_each_step": True,
        "peer_ref_model_in_memory": last["trl"]["ref_model_in_memory"],
        "batch_pairs": args.batch, "max_length": 128, "dtype": "fp32",
        "warmup_steps": args.warmup, "timed_steps": args.steps, "rounds": args.rounds,
        "dataset_pairs": args.pairs, "threads": last["echo"]["threads"],
        "model": "7M: hidden 256, 4 layers, 4 heads / 2 KV, vocab 8192, d_mlp 768, untied",
        "optimizers": {"ours": "Muon (hidden matrices) + AdamW", "peer": "AdamW"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "peer": "trl.DPOTrainer(LlamaForCausalLM sdpa, ref_model = a frozen copy)",
    }
    if "trl_pre" in step_s:
        pre = median(step_s["trl_pre"])
        detail.update(peer_precompute=round(pre, 4), ratio_vs_peer_precompute=round(ours / pre, 3),
                      peak_rss_mb_peer_precompute=round(max(rss["trl_pre"]), 1))
    if "echo_adamw" in step_s:
        adamw = median(step_s["echo_adamw"])
        detail.update(ours_adamw=round(adamw, 4), ratio_ours_adamw=round(adamw / peer, 3),
                      peak_rss_mb_ours_adamw=round(max(rss["echo_adamw"]), 1))
    return {"bench": "dpo_step", "ours": round(ours, 4), "peer": round(peer, 4),
            "ratio": round(ours / peer, 3), "unit": "s/step", "detail": detail}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--pairs", type=int, default=256, help="pairs in the dataset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (default 1, see above; 0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--peer-precompute", action="store_true",
                   help="also time TRL with precompute_ref_log_probs=True")
    p.add_argument("--ours-adamw", action="store_true",
                   help="also time Echo with AdamW instead of Muon + AdamW")
    p.add_argument("--side", choices=["echo", "echo_adamw", "trl", "trl_pre"],
                   help="run one side only (child mode)")
    p.add_argument("--profile", action="store_true", help="with --side: torch.profiler table")
    args = p.parse_args()
    emit_json(run_side(args) if args.side else compare(args))


if __name__ == "__main__":
    main()
