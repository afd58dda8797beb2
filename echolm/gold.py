"""A policy measured against the gold annotator: held-out RLHF prompts answered, scored by the
reward model (proxy) and by the simulated annotator (gold: what people want), with the KL to
a reference, length and repetition; and a stage's gold win rate against the SFT model. The
RLHF guard and the final figures of RLHF and DPO measure this way (`echolm eval` scores one
greedy answer per prompt with the same annotator: scorecard.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from echolm.annotator import gold_score
from echolm.atomic import atomic_write_json
from echolm.checkpoint import chat_model_dir, file_fingerprint, load_model
from echolm.config import Config, RLHFConfig
from echolm.data.prompts import PromptItem, rlhf_prompts
from echolm.model import Transformer
from echolm.reward import RewardModel, load_reward_model
from echolm.rollout import pad_batch, sample_responses, token_logprobs
from echolm.runfiles import read_cache
from echolm.tokenizer import Tokenizer

FINAL_EVAL_SEED = 1  # not the seed the guard chose by


def repetition(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one (0 = none)."""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class EvalResult:
    proxy: float | None  # None: no reward model (DPO without one)
    gold: float
    kl: float
    length: float
    repetition: float
    finished: float
    win_rate: float | None = None


@torch.inference_mode()
def evaluate_policy(model: Transformer, reference: Transformer | None, rm, tok: Tokenizer,
                    items: list[PromptItem], p: RLHFConfig, seed: int = 0,
                    baseline: list[float] | None = None, samples: int = 1
                    ) -> tuple[EvalResult, list[float], list[str]]:
    """Answer held-out prompts `samples` times each (fixed seed) and measure proxy, gold, KL,
    length, repetition; gold is averaged per prompt (returned, one per prompt), and the win
    rate compares those per-prompt means with `baseline`'s (ties count half). More samples
    per prompt make a single temperature-1 answer's luck matter less. reference None: the
    model is its own reference (the SFT model itself), KL 0 without two forward passes."""
    prompts = [tok.render_user(it.text) for it in items]
    sampled = sample_responses(model, tok, prompts, samples, p.max_tokens, p.temperature, seed,
                               desc=f"gold: {len(prompts)} prompts x {samples}")
    texts = [tok.decode(s.answer) for s in sampled]
    finished = [s.stopped for s in sampled]
    rows = [it for it in items for _ in range(samples)]  # prompt-major, as sampled
    proxy = (None if rm is None else
             float(rm.score(tok, [it.text for it in rows], texts, finished).float().mean()))
    scores = [gold_score(it, t, f) for it, t, f in zip(rows, texts, finished, strict=True)]
    gold = [sum(scores[i * samples:(i + 1) * samples]) / samples for i in range(len(items))]
    kl = 0.0
    if reference is not None:
        device = next(model.parameters()).device
        x, y, mask = (t.to(device) for t in pad_batch([q for q in prompts for _ in range(samples)],
                                                      [s.ids for s in sampled], tok.pad))
        kl_seq = []
        for i in range(0, len(x), 64):  # 1,024 answers' logits at once: ~2 GB per model
            xs, ys, ms = x[i:i + 64], y[i:i + 64], mask[i:i + 64]
            diff = token_logprobs(model, xs, ys, ms)[0] - token_logprobs(reference, xs, ys, ms)[0]
            kl_seq.append(diff.sum(1))
        kl = float(torch.cat(kl_seq).mean())
    win = None
    if baseline is not None:
        win = sum(1.0 if g > b else 0.5 if g == b else 0.0
                  for g, b in zip(gold, baseline, strict=True)) / len(gold)
    res = EvalResult(proxy=proxy, gold=sum(gold) / len(gold), kl=kl,
                     length=sum(len(s.ids) for s in sampled) / len(sampled),
                     repetition=sum(map(repetition, texts)) / len(texts),
                     finished=sum(finished) / len(finished), win_rate=win)
    return res, gold, texts


def optional_reward_model(run_dir: Path) -> RewardModel | None:
    """The run's reward model, or None when it has none (DPO's gold figures need none: the
    proxy reward is then left out)."""
    rm_dir = run_dir / "rm"
    return load_reward_model(rm_dir) if (rm_dir / "model.safetensors").exists() else None


def sft_baseline(cfg: Config, run_dir: Path, log=print) -> dict:
    """SFT's answers to the held-out prompts as the final figures compare against: gold per
    prompt, proxy, and how long measuring one model took (a stage times its budget by it).
    `final_samples` answers per prompt, with a sampling seed no model was selected with.
    Kept in DIR/sft_baseline.json for the same SFT model, reward model and settings (RLHF
    and DPO share it; a retrained model or a changed setting measures again, as does a
    corrupt file)."""
    p = cfg.rlhf
    path = run_dir / "sft_baseline.json"
    rm_file = run_dir / "rm" / "model.safetensors"
    key = "/".join([file_fingerprint(chat_model_dir(run_dir) / "model.safetensors"),
                    file_fingerprint(rm_file) if rm_file.exists() else "no reward model",
                    str((p.eval_prompts, p.final_samples, p.max_tokens, p.temperature))])
    cached = read_cache(path, log)
    if cached is not None and cached.get("key") == key:
        return cached
    t0 = time.perf_counter()
    tok = Tokenizer.load(run_dir / "tokenizer")
    rm = optional_reward_model(run_dir)
    items = rlhf_prompts("val", p.eval_prompts, 0)
    ev, gold, _ = evaluate_policy(load_model(chat_model_dir(run_dir)), None, rm, tok, items, p,
                                  seed=FINAL_EVAL_SEED, samples=p.final_samples)
    result = {"gold": gold, "mean_gold": ev.gold, "proxy": ev.proxy,
              "seconds": round(time.perf_counter() - t0, 2), "key": key}
    atomic_write_json(path, result)
    return result


def gold_win_rate(cfg: Config, run_dir: Path, stage: str, baseline: dict | None = None,
                  log=print, model_dir: Path | None = None) -> dict:
    """Gold reward of `stage`'s answers to the held-out RLHF prompts and its win rate against
    SFT's (`baseline` from `sft_baseline`, measured here if None): same prompts,
    `final_samples` answers each, gold averaged per prompt, ties count half. The model is
    DIR/<stage>'s, or `model_dir`'s (a --force redo's, not yet swapped in)."""
    p = cfg.rlhf
    baseline = baseline or sft_baseline(cfg, run_dir, log)
    tok = Tokenizer.load(run_dir / "tokenizer")
    sft = load_model(chat_model_dir(run_dir))
    rm = optional_reward_model(run_dir)
    items = rlhf_prompts("val", p.eval_prompts, 0)
    ev, _, _ = evaluate_policy(load_model(model_dir or run_dir / stage), sft, rm, tok, items, p,
                               seed=FINAL_EVAL_SEED, samples=p.final_samples,
                               baseline=baseline["gold"])
    proxy = ("" if ev.proxy is None or baseline.get("proxy") is None else
             f", proxy {baseline['proxy']:.3f} -> {ev.proxy:.3f}")
    log(f"{stage}: gold {baseline['mean_gold']:.3f} (SFT) -> {ev.gold:.3f}, win rate vs SFT "
        f"{ev.win_rate:.1%} (n={len(items)} prompts x {p.final_samples} answers){proxy}, "
        f"KL {ev.kl:.2f}")
    return {"gold_win_rate_vs_sft": round(ev.win_rate, 4), "gold_reward": round(ev.gold, 4),
            "sft_gold": round(baseline["mean_gold"], 4),
            "proxy_reward": None if ev.proxy is None else round(ev.proxy, 4),
            "kl": round(ev.kl, 4), "n": len(items), "samples_per_prompt": p.final_samples,
            "temperature": p.temperature}
