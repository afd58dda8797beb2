"""Stage 5b, RLHF: optimise the SFT policy against the reward model learned from rankings,
with a KL penalty that keeps it near the SFT model, and a guard against reward hacking.

Algorithms: PPO with a value head and GAE (InstructGPT: per-token reward -beta * KL, the
reward model's score at the last token), or critic-free RLOO / GRPO that share the RL
stage's machinery (one sequence-level reward: score - beta * KL). Reward-model scores are
normalised with running statistics; an answer that never ends its turn is penalised.

The guard: every `eval_every` steps, held-out prompts are answered and measured by the proxy
(the reward model), the gold (the simulated annotator: what people actually want), the KL to
the SFT model, length and repetition. The best model by gold is kept; when gold has fallen
for `guard_patience` evaluations while proxy rose, training stops. Gao, Schulman & Hilton
(2022) found exactly this shape: gold first rises then falls as KL grows, proxy keeps rising.
An optional unguarded run (kl_beta = 0, `overopt_steps`) draws that curve.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echolm.annotator import gold_score
from echolm.checkpoint import atomic_write_json, load_model, save_model
from echolm.config import Config, PPOConfig, TrainConfig
from echolm.data.prompts import PromptItem, rlhf_prompts
from echolm.errors import EchoError
from echolm.losses import (
    best_of_group_advantages,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    rloo_advantages,
)
from echolm.model import Transformer
from echolm.summary import update_summary
from echolm.tokenizer import Tokenizer
from echolm.train.grpo import pad_batch, sample_responses
from echolm.train.loop import Trainer, autocast, finished_stage, setup_distributed
from echolm.train.reward_model import load_reward_model
from echolm.train.sft import sft_rows


class PolicyWithValue(nn.Module):
    """The policy plus a scalar value head on its final hidden states (PPO's critic)."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.cfg = policy.cfg
        self.value_head = nn.Linear(policy.cfg.n_embd, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        hook = self.policy.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = self.policy(idx)
        finally:
            hook.remove()
        return logits, self.value_head(captured[0]).squeeze(-1).float()


def response_logprobs(logits: Tensor, y: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)


def repetition(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one (0 = none)."""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class RunningMoments:
    """Running mean/std of reward-model scores (reward normalisation)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: list[float]) -> None:
        for x in xs:  # Welford
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return (self.m2 / (self.n - 1)) ** 0.5 if self.n > 1 else 1.0


@dataclass
class EvalResult:
    proxy: float
    gold: float
    kl: float
    length: float
    repetition: float
    finished: float
    win_rate: float | None = None


@torch.inference_mode()
def evaluate_policy(model: Transformer, reference: Transformer | None, rm, tok: Tokenizer,
                    items: list[PromptItem], p: PPOConfig, seed: int = 0,
                    baseline: list[float] | None = None, samples: int = 1
                    ) -> tuple[EvalResult, list[float], list[str]]:
    """Answer held-out prompts `samples` times each (fixed seed) and measure proxy, gold, KL,
    length, repetition; gold is averaged per prompt (returned, one per prompt), and the win
    rate compares those per-prompt means with `baseline`'s (ties count half). More samples
    per prompt make a single temperature-1 answer's luck matter less. reference None: the
    model is its own reference (the SFT model itself), KL 0 without two forward passes."""
    prompts = [tok.render_prompt([{"role": "user", "content": it.text}]) for it in items]
    sampled = sample_responses(model, tok, prompts, samples, p.max_tokens, p.temperature, seed)
    texts = [tok.decode(r[:-1] if done else r) for r, done in sampled]
    finished = [done for _, done in sampled]
    rows = [it for it in items for _ in range(samples)]  # prompt-major, as sampled
    proxy = rm.score(tok, [it.text for it in rows], texts, finished).float()
    scores = [gold_score(it, t, f) for it, t, f in zip(rows, texts, finished, strict=True)]
    gold = [sum(scores[i * samples:(i + 1) * samples]) / samples for i in range(len(items))]
    kl = 0.0
    if reference is not None:
        x, y, mask = pad_batch([q for q in prompts for _ in range(samples)],
                               [r for r, _ in sampled], tok.pad)
        kl_seq = []
        for i in range(0, len(x), 64):  # 1,024 answers' logits at once: ~2 GB per model
            xs, ys = x[i:i + 64], y[i:i + 64]
            diff = response_logprobs(model(xs), ys) - response_logprobs(reference(xs), ys)
            kl_seq.append((diff * mask[i:i + 64]).sum(1))
        kl = float(torch.cat(kl_seq).mean())
    win = None
    if baseline is not None:
        win = sum(1.0 if g > b else 0.5 if g == b else 0.0
                  for g, b in zip(gold, baseline, strict=True)) / len(gold)
    res = EvalResult(proxy=float(proxy.mean()), gold=sum(gold) / len(gold), kl=kl,
                     length=sum(len(r) for r, _ in sampled) / len(sampled),
                     repetition=sum(map(repetition, texts)) / len(texts),
                     finished=sum(finished) / len(finished), win_rate=win)
    return res, gold, texts


def _policy_loss(model: nn.Module, item: tuple, p: PPOConfig, stats: dict) -> Tensor:
    """PPO (per-token advantages + value loss) or critic-free (per-sequence advantages),
    plus `ptx_coef` x the SFT loss on a micro-batch of SFT rows when one is given."""
    batch, idx, ptx = item
    x, y, mask = batch["x"][idx], batch["y"][idx], batch["mask"][idx]
    if p.algorithm == "ppo":
        logits, values = model(x)
    else:
        logits, values = model(x), None
    logp = response_logprobs(logits, y)
    loss, st = clipped_policy_loss(logp, batch["logp_old"][idx], batch["adv"][idx], mask,
                                   p.clip, p.clip, "token")
    if values is not None:
        vloss = clipped_value_loss(values, batch["values_old"][idx], batch["returns"][idx],
                                   mask, p.value_clip)
        loss = loss + p.vf_coef * vloss
        stats["value_loss"] = float(vloss.detach())
    stats["clip_frac"] = float(st["clip_frac"])
    if ptx is not None:
        policy = model.policy if isinstance(model, PolicyWithValue) else model
        x_sft, y_sft, m_sft = (t.to(x.device) for t in ptx)
        sft_loss = policy(x_sft, targets=y_sft, loss_mask=m_sft)
        loss = loss + p.ptx_coef * sft_loss
        stats["ptx_loss"] = float(sft_loss.detach())
    return loss


def optimise(cfg: Config, run_dir: Path, out: Path, p: PPOConfig, tcfg: TrainConfig,
             stage: str, log=print) -> tuple[dict, Transformer]:
    """One RLHF run into `out` (the guarded main run, or the unguarded curve run); returns
    its state (evaluation history ...) and the trained policy."""
    d = setup_distributed()
    tok = Tokenizer.load(run_dir / "tokenizer")
    policy = load_model(run_dir / "sft")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = load_reward_model(run_dir / "rm")
    model: nn.Module = PolicyWithValue(policy) if p.algorithm == "ppo" else policy
    train_items = rlhf_prompts("train", p.train_prompts, tcfg.seed)
    eval_items = rlhf_prompts("val", p.eval_prompts, 0)
    ptx = sft_rows(cfg, tok, p.ptx_rows) if p.ptx_coef > 0 else None

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, tcfg, out, stage, run_dir, d)
    if trainer.resume():
        log(f"{stage}: resuming from step {trainer.step_idx}")
    ex = trainer.extra
    if "sft_gold" not in ex:
        sft_eval, ex["sft_gold"], _ = evaluate_policy(policy, None, rm, tok, eval_items, p,
                                                      samples=p.eval_samples)
        ex["history"] = [{"step": 0, **sft_eval.__dict__, "win_rate": 0.5}]
        ex["best_gold"], ex["moments"], ex["stopped_by_guard"] = sft_eval.gold, (0, 0.0, 0.0), False
        log(f"{stage}: SFT model: proxy {sft_eval.proxy:.3f}, gold {sft_eval.gold:.3f}")
    moments = RunningMoments()
    moments.n, moments.mean, moments.m2 = ex["moments"]
    ctx = autocast(d.device, trainer.dtype)
    bar = trainer.progress(stage)
    k = max(1, p.samples_per_prompt)
    while (trainer.step_idx < tcfg.max_steps and not trainer.out_of_time()
           and not ex["stopped_by_guard"]):
        step, t_iter, elapsed = trainer.step_idx, time.perf_counter(), trainer.elapsed
        rng = random.Random(f"{tcfg.seed}:{step}")
        items = rng.sample(train_items, min(p.prompts_per_step, len(train_items)))
        prompts = [tok.render_prompt([{"role": "user", "content": it.text}]) for it in items]
        sampled = sample_responses(policy, tok, prompts, k, p.max_tokens, p.temperature,
                                   seed=tcfg.seed * 7919 + step)
        flat_prompts = [pr for pr in prompts for _ in range(k)]
        flat_items = [it for it in items for _ in range(k)]
        texts = [tok.decode(r[:-1] if done else r) for r, done in sampled]
        finished = torch.tensor([done for _, done in sampled], dtype=torch.float32)
        with torch.no_grad():
            raw = rm.score(tok, [it.text for it in flat_items], texts,
                           [bool(f) for f in finished.tolist()]).float()
        moments.update(raw.tolist())
        score = (raw - moments.mean) / (moments.std + 1e-6) if p.normalize_reward else raw
        score = score - p.unfinished_penalty * (1 - finished)
        x, y, mask = pad_batch(flat_prompts, [r for r, _ in sampled], tok.pad)
        with torch.no_grad(), ctx:
            if p.algorithm == "ppo":
                logits, values_old = model(x)
            else:
                logits, values_old = model(x), None
            logp_old = response_logprobs(logits, y)
            logp_ref = response_logprobs(reference(x), y)
        kl_tok = (logp_old - logp_ref) * mask
        batch = {"x": x, "y": y, "mask": mask, "logp_old": logp_old}
        if p.algorithm == "ppo":
            last = mask.cumsum(1).argmax(1)  # position of each row's last response token
            rewards = -p.kl_beta * kl_tok
            rewards[torch.arange(len(sampled)), last] += score
            adv, returns = gae(rewards, values_old * mask, mask, p.gamma, p.lam)
            m = mask.bool()
            adv = (adv - adv[m].mean()) / (adv[m].std() + 1e-8) * mask  # whitened
            batch.update(adv=adv, returns=returns, values_old=values_old)
        else:
            seq_reward = (score - p.kl_beta * kl_tok.sum(1)).view(-1, k)
            if k < 2:
                raise EchoError(f"ppo.algorithm={p.algorithm} needs samples_per_prompt >= 2")
            adv = {"rloo": rloo_advantages, "grpo": group_advantages,
                   "best": best_of_group_advantages}[p.algorithm](seq_reward)
            batch["adv"] = adv.flatten()
        stats: dict = {}
        loss_fn = partial(_policy_loss, p=p, stats=stats)
        order = torch.randperm(len(sampled), generator=torch.Generator().manual_seed(step))
        n_updates = p.epochs * p.minibatches
        for e in range(p.epochs):
            for j, idx in enumerate(order.chunk(p.minibatches)):
                # SFT rows: a function of (step, update), so a resumed run sees the same ones
                rows = ptx.micro_batches(step * n_updates + e * p.minibatches + j)[0] if (
                    ptx is not None) else None
                trainer.step([(batch, idx, rows)], loss_fn, int(mask[idx].sum()))
        trainer.step_idx = step + 1  # one RLHF step = one batch of samples
        ex["moments"] = (moments.n, moments.mean, moments.m2)
        rec = {"step": trainer.step_idx, "proxy_train": round(float(raw.mean()), 4),
               "kl_train": round(float(kl_tok.sum(1).mean()), 4),
               "finished_train": round(float(finished.mean()), 4),
               "length_train": round(float(mask.sum(1).float().mean()), 2), **{
                   s: round(v, 5) for s, v in stats.items()}}
        if trainer.step_idx % p.eval_every == 0 or trainer.step_idx == tcfg.max_steps:
            ev, _, _ = evaluate_policy(policy, reference, rm, tok, eval_items, p,
                                       baseline=ex["sft_gold"], samples=p.eval_samples)
            ex["history"].append({"step": trainer.step_idx, **ev.__dict__})
            rec.update({f"eval_{k2}": round(v, 4) for k2, v in ev.__dict__.items()})
            if ev.gold > ex["best_gold"]:
                ex["best_gold"] = ev.gold
                save_model(policy, out / "best")
            if p.guard and guard_should_stop([h["gold"] for h in ex["history"]],
                                             [h["proxy"] for h in ex["history"]],
                                             p.guard_patience):
                ex["stopped_by_guard"] = True
                log(f"{stage}: guard: gold fell for {p.guard_patience} evaluations while proxy "
                    f"rose: stopping at step {trainer.step_idx}")
        trainer.elapsed = elapsed + time.perf_counter() - t_iter  # sampling counts too
        trainer.metrics.write(**rec)
        bar.update(trainer.step_idx - bar.n)
        bar.set_postfix(proxy=f"{rec['proxy_train']:.2f}", kl=f"{rec['kl_train']:.2f}")
        if trainer.step_idx % tcfg.ckpt_every == 0 or ex["stopped_by_guard"]:
            trainer.save()
    bar.close()
    trainer.save()
    return ex, policy


def guard_should_stop(gold: list[float], proxy: list[float], patience: int) -> bool:
    """True when the last `patience` evaluations each lowered gold below the best so far
    while proxy rose over the same stretch: the policy is learning to please the reward
    model, not people."""
    if len(gold) <= patience:
        return False
    recent = gold[-patience:]
    best_before = max(gold[:-patience])
    falling = all(b < a for a, b in zip([gold[-patience - 1]] + recent[:-1], recent,
                                        strict=True))
    return falling and recent[-1] < best_before and proxy[-1] > proxy[-patience - 1]


def run_rlhf(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    out, done = run_dir / "rlhf", run_dir / "rlhf" / "done.json"
    if (finished := finished_stage(out, "rlhf", force, log,
                                   also=(run_dir / "rlhf_unguarded",))) is not None:
        return finished
    p, tcfg = cfg.ppo, cfg.rlhf
    if p.algorithm not in ("ppo", "rloo", "grpo", "best"):
        raise EchoError(f"ppo.algorithm must be ppo, rloo, grpo or best, got {p.algorithm!r}")
    if p.ptx_coef < 0 or p.ptx_rows < 1:
        raise EchoError(f"ppo.ptx_coef={p.ptx_coef} must be >= 0 and ppo.ptx_rows="
                        f"{p.ptx_rows} >= 1")
    ex, policy = optimise(cfg, run_dir, out, p, tcfg, "rlhf", log)
    curve = None
    if p.overopt_steps > 0:  # the over-optimisation curve: no KL penalty, no guard, longer
        log(f"rlhf: unguarded run (kl_beta=0, no ptx, {p.overopt_steps} steps) for the "
            "over-optimisation curve")
        free = replace(p, kl_beta=0.0, guard=False, ptx_coef=0.0)
        m = p.overopt_lr_mult
        fast = replace(tcfg, max_steps=p.overopt_steps, lr_matrix=tcfg.lr_matrix * m,
                       lr_embed=tcfg.lr_embed * m, lr_head=tcfg.lr_head * m,
                       lr_scalar=tcfg.lr_scalar * m)
        curve, _ = optimise(cfg, run_dir, run_dir / "rlhf_unguarded", free, fast,
                            "rlhf_unguarded", log)
    # the model the stage hands on: the best by gold when the guard is on
    best = max(ex["history"], key=lambda h: h["gold"]) if p.guard else ex["history"][-1]
    if p.guard and best["step"] == 0:  # nothing beat SFT by gold: hand on SFT itself
        log("rlhf: no step beat the SFT model on gold reward; the stage keeps the SFT model")
        policy = load_model(run_dir / "sft")
    elif p.guard and (out / "best" / "model.safetensors").exists():
        policy = load_model(out / "best")
    save_model(policy, out)
    # The step was chosen by gold on these prompts and samples, so its own figures flatter it
    # (the best of several noisy measurements): the stage's result is measured afresh, with
    # another sampling seed and more answers per prompt, exactly as DPO's is.
    final = gold_win_rate(cfg, run_dir, "rlhf", log=log)
    result = {**final, "guard_stopped": ex["stopped_by_guard"], "best_step": best["step"],
              "selection": {k: round(best[k], 4) for k in ("gold", "win_rate", "proxy", "kl")},
              "algorithm": p.algorithm, "kl_beta": p.kl_beta, "ptx_coef": p.ptx_coef,
              "history": ex["history"],
              "unguarded_history": curve["history"] if curve else None}
    update_summary(run_dir, "rlhf", {k: v for k, v in result.items()
                                     if k not in ("history", "unguarded_history")})
    atomic_write_json(done, result)
    log(f"rlhf: step {best['step']} kept (0 = SFT itself; gold {best['gold']:.3f} when chosen); "
        f"guard stopped: {result['guard_stopped']}")
    return result


FINAL_EVAL_SEED = 1  # not the seed the guard chose by


def gold_win_rate(cfg: Config, run_dir: Path, stage: str, log=print) -> dict:
    """Gold reward of `stage`'s answers to the held-out RLHF prompts and its win rate against
    SFT's (same prompts; `final_samples` answers each, gold averaged per prompt; a sampling
    seed no model was selected with; ties count half)."""
    p = cfg.ppo
    tok = Tokenizer.load(run_dir / "tokenizer")
    sft = load_model(run_dir / "sft")
    rm = load_reward_model(run_dir / "rm")
    items = rlhf_prompts("val", p.eval_prompts, 0)
    kw = {"seed": FINAL_EVAL_SEED, "samples": p.final_samples}
    sft_ev, sft_gold, _ = evaluate_policy(sft, None, rm, tok, items, p, **kw)
    ev, _, _ = evaluate_policy(load_model(run_dir / stage), sft, rm, tok, items, p,
                               baseline=sft_gold, **kw)
    log(f"{stage}: gold {sft_ev.gold:.3f} (SFT) -> {ev.gold:.3f}, win rate vs SFT "
        f"{ev.win_rate:.1%} (n={len(items)} prompts x {p.final_samples} answers), proxy "
        f"{sft_ev.proxy:.3f} -> {ev.proxy:.3f}, KL {ev.kl:.2f}")
    return {"gold_win_rate_vs_sft": round(ev.win_rate, 4), "gold_reward": round(ev.gold, 4),
            "sft_gold": round(sft_ev.gold, 4), "proxy_reward": round(ev.proxy, 4),
            "kl": round(ev.kl, 4), "n": len(items), "samples_per_prompt": p.final_samples}
