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

import random
import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from echolm.atomic import atomic_write_json
from echolm.checkpoint import (
    chat_model_dir,
    file_fingerprint,
    load_model,
    model_file,
    save_model,
)
from echolm.config import Config, RLHFConfig
from echolm.data.chat import sft_rows
from echolm.data.prompts import rlhf_prompts
from echolm.gold import evaluate_policy, gold_win_rate, sft_baseline
from echolm.lora import (
    finish_lora,
    frozen_reference,
    has_lora,
    save_adapter,
    save_merged,
    start_lora,
)
from echolm.losses import (
    best_of_group_advantages,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    rloo_advantages,
)
from echolm.model import Transformer
from echolm.outdir import replacing
from echolm.reward import load_reward_model
from echolm.rollout import pad_batch, response_logprobs, sample_responses, token_logprobs
from echolm.runfiles import read_cache
from echolm.runtime import autocast, single_process
from echolm.staging import StageOutput
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer


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


def _policy_loss(model: nn.Module, item: tuple, p: RLHFConfig, stats: dict) -> Tensor:
    """PPO (per-token advantages + value loss) or critic-free (per-sequence advantages),
    plus `ptx_coef` x the SFT loss on a micro-batch of SFT rows when one is given. Appends
    this update's diagnostics to `stats` (the step logs their means over its updates)."""
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
        stats.setdefault("value_loss", []).append(float(vloss.detach()))
    for k in ("clip_frac", "approx_kl"):
        stats.setdefault(k, []).append(float(st[k]))
    if ptx is not None:
        policy = model.policy if isinstance(model, PolicyWithValue) else model
        x_sft, y_sft, m_sft = (t.to(x.device) for t in ptx)
        sft_loss = policy(x_sft, targets=y_sft, loss_mask=m_sft)
        loss = loss + p.ptx_coef * sft_loss
        stats.setdefault("ptx_loss", []).append(float(sft_loss.detach()))
    return loss


def optimise(cfg: Config, run_dir: Path, out: Path, p: RLHFConfig,
             stage: str, started: float, budget_s: float, reserve_s: float = 0.0,
             sft_eval: dict | None = None, log=print, log_dir: Path | None = None
             ) -> tuple[dict, Transformer, dict]:
    """One RLHF run into `out` (the guarded main run, or the unguarded curve run) within
    `budget_s` seconds of the stage's clock (started at `started`), leaving `reserve_s` for
    what follows; returns its state (evaluation history ...), the trained policy, and the
    Trainer's facts. One step = one batch of `prompts_per_step` x `samples_per_prompt`
    answers, learned from in `epochs x minibatches` updates. `sft_eval`: the SFT model's
    evaluation from an earlier run with the same settings (the curve run reuses the main
    run's), else it is measured first. `log_dir`: where metrics.jsonl is (default DIR)."""
    d = single_process(stage, "generation is not sharded")
    tok = Tokenizer.load(run_dir / "tokenizer")
    policy = load_model(chat_model_dir(run_dir), d.device)  # first: the reference copies it
    lora = start_lora(policy, p, stage, log)  # before the value head: it stays trainable
    # with LoRA the policy's own base (adapters off, no second copy), else a frozen copy, in
    # fp32 whatever the training dtype: the guard evaluation measures KL outside autocast
    reference = frozen_reference(policy)
    rm = load_reward_model(run_dir / "rm", d.device)
    model: nn.Module = PolicyWithValue(policy) if p.algorithm == "ppo" else policy
    train_items = rlhf_prompts("train", p.train_prompts, p.seed)
    eval_items = rlhf_prompts("val", p.eval_prompts, 0)
    ptx = sft_rows(cfg, tok, p.ptx_rows) if p.ptx_coef > 0 else None

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, p, out, stage, log_dir or run_dir, d, budget_s=budget_s,
                      started=started, unit="batch")
    if trainer.resume():
        log(f"{stage}: resuming from step {trainer.step}")
    ex = trainer.extra
    if "sft_gold" not in ex and sft_eval is not None:
        ex.update(sft_gold=sft_eval["sft_gold"], eval_seconds=sft_eval["eval_seconds"],
                  history=sft_eval["history"][:1], best_gold=sft_eval["history"][0]["gold"],
                  moments=(0, 0.0, 0.0), stopped_by_guard=False)
    if "sft_gold" not in ex:
        t0 = time.perf_counter()
        sft_eval, ex["sft_gold"], _ = evaluate_policy(policy, None, rm, tok, eval_items, p,
                                                      samples=p.eval_samples)
        ex["eval_seconds"] = time.perf_counter() - t0
        ex["history"] = [{"step": 0, **sft_eval.__dict__, "win_rate": 0.5}]
        ex["best_gold"], ex["moments"], ex["stopped_by_guard"] = sft_eval.gold, (0, 0.0, 0.0), False
        log(f"{stage}: SFT model: proxy {sft_eval.proxy:.3f}, gold {sft_eval.gold:.3f}")
    # a guard evaluation also runs the reference over every answer (the KL): ~1.3x the SFT one
    trainer.plan(reserve_s=reserve_s, periodic_s=1.3 * ex["eval_seconds"] / p.eval_every,
                 every=p.eval_every)
    moments = RunningMoments()
    moments.n, moments.mean, moments.m2 = ex["moments"]
    ctx = autocast(d.device, trainer.dtype)
    k = max(1, p.samples_per_prompt)
    while trainer.running() and not ex["stopped_by_guard"]:
        step = trainer.step
        rng = random.Random(f"{p.seed}:{step}")
        items = rng.sample(train_items, min(p.prompts_per_step, len(train_items)))
        prompts = [tok.render_user(it.text) for it in items]
        sampled = sample_responses(policy, tok, prompts, k, p.max_tokens, p.temperature,
                                   seed=p.seed * 7919 + step)
        flat_prompts = [pr for pr in prompts for _ in range(k)]
        flat_items = [it for it in items for _ in range(k)]
        texts = [tok.decode(s.answer) for s in sampled]
        finished = torch.tensor([s.stopped for s in sampled], dtype=torch.float32)
        with torch.no_grad():
            raw = rm.score(tok, [it.text for it in flat_items], texts,
                           [bool(f) for f in finished.tolist()]).float()
        moments.update(raw.tolist())
        score = (raw - moments.mean) / (moments.std + 1e-6) if p.normalize_reward else raw
        score = (score - p.unfinished_penalty * (1 - finished)).to(d.device)
        x, y, mask = (t.to(d.device) for t in pad_batch(flat_prompts, [s.ids for s in sampled],
                                                        tok.pad))
        with torch.no_grad(), ctx:
            if p.algorithm == "ppo":
                logits, values_old = model(x)
            else:
                logits, values_old = model(x), None
            logp_old = response_logprobs(logits, y)
            logp_ref = token_logprobs(reference, x, y, mask)[0]
        kl_tok = (logp_old - logp_ref) * mask
        batch = {"x": x, "y": y, "mask": mask, "logp_old": logp_old}
        if p.algorithm == "ppo":
            last = mask.cumsum(1).argmax(1)  # position of each row's last response token
            rewards = -p.kl_beta * kl_tok
            rewards[torch.arange(len(sampled), device=d.device), last] += score
            adv, returns = gae(rewards, values_old * mask, mask, p.gamma, p.lam)
            m = mask.bool()
            adv = (adv - adv[m].mean()) / (adv[m].std() + 1e-8) * mask  # whitened
            batch.update(adv=adv, returns=returns, values_old=values_old)
            # how much of the returns' variance the critic explained before this step's updates
            explained = explained_variance(values_old, returns, mask)
        else:
            seq_reward = (score - p.kl_beta * kl_tok.sum(1)).view(-1, k)
            adv = {"rloo": rloo_advantages, "grpo": group_advantages,
                   "best": best_of_group_advantages}[p.algorithm](seq_reward)
            batch["adv"] = adv.flatten()
        stats: dict[str, list[float]] = {}
        loss_fn = partial(_policy_loss, p=p, stats=stats)
        order = torch.randperm(len(sampled), generator=torch.Generator().manual_seed(step))
        n_updates = p.epochs * p.minibatches
        losses = []
        for e in range(p.epochs):
            for j, idx in enumerate(order.chunk(p.minibatches)):
                # SFT rows: a function of (step, update), so a resumed run sees the same ones
                rows = ptx.micro_batches(step * n_updates + e * p.minibatches + j)[0] if (
                    ptx is not None) else None
                losses.append(trainer.update([(batch, idx, rows)], loss_fn, int(mask[idx].sum())))
        ex["moments"] = (moments.n, moments.mean, moments.m2)
        rec = {"loss": sum(losses) / len(losses), "proxy_train": round(float(raw.mean()), 4),
               "kl_train": round(float(kl_tok.sum(1).mean()), 4),
               "finished_train": round(float(finished.mean()), 4),
               "length_train": round(float(mask.sum(1).float().mean()), 2), **{
                   s: round(sum(v) / len(v), 5) for s, v in stats.items()}}
        if p.algorithm == "ppo" and explained == explained:  # not NaN
            rec["explained_variance"] = round(explained, 4)
        if (step + 1) % p.eval_every == 0 or step + 1 == trainer.schedule.steps:
            with trainer.evaluating():
                ev, _, _ = evaluate_policy(policy, reference, rm, tok, eval_items, p,
                                           baseline=ex["sft_gold"], samples=p.eval_samples)
            ex["history"].append({"step": step + 1, **ev.__dict__})
            rec.update({f"eval_{k2}": round(v, 4) for k2, v in ev.__dict__.items()})
            if ev.gold > ex["best_gold"]:
                ex["best_gold"] = ev.gold
                save_merged(policy, out / "best")
                if has_lora(policy):
                    save_adapter(policy, out / "best" / "adapter", str(chat_model_dir(run_dir)))
            if p.guard and guard_should_stop([h["gold"] for h in ex["history"]],
                                             [h["proxy"] for h in ex["history"]],
                                             p.guard_patience):
                ex["stopped_by_guard"] = True
                log(f"{stage}: guard: gold fell for {p.guard_patience} evaluations while proxy "
                    f"rose: stopping at step {step + 1}")
        trainer.end_step(rec, show=("proxy_train", "kl_train", "eval_gold"))
    facts = trainer.finish()  # checkpoints a guard's stop too: a resume reads the decision
    facts["lora"] = lora
    return ex, policy, facts


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
    """The guarded run, the kept model's final measurement against SFT, then (optionally)
    the unguarded run that draws the over-optimisation curve, all within `rlhf.max_minutes`:
    the guarded run gets its share of the budget by planned steps, the curve run the rest."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "rlhf", force, also=("rlhf_unguarded",))
    if (finished := stage.finished(log)) is not None:
        return finished
    p = cfg.rlhf
    # the inputs, read before anything is written: the measurement below may be cached
    single_process("rlhf", "generation is not sharded")
    Tokenizer.load(run_dir / "tokenizer")
    load_model(chat_model_dir(run_dir))
    load_reward_model(run_dir / "rm")
    # SFT's answers for the final figure, first: the kept model is measured the same way
    # later (plus a KL pass: ~1.3x), so this times what the budget must keep for it
    baseline = sft_baseline(cfg, run_dir, log)
    out = stage.start(log)
    final_s = 1.3 * baseline["seconds"]
    budget = 60 * p.max_minutes
    share = p.max_steps / (p.max_steps + p.overopt_steps)
    main_budget = (baseline["seconds"] + (budget - baseline["seconds"]) * share) if budget else 0
    ex, policy, facts = optimise(cfg, run_dir, out, p, "rlhf", started, main_budget,
                                 reserve_s=final_s, log=log, log_dir=stage.log_dir)
    guarded_end = time.perf_counter()  # facts["minutes"]: the stage's clock then (resumes too)
    # the model the stage hands on: the best by gold when the guard is on
    best = max(ex["history"], key=lambda h: h["gold"]) if p.guard else ex["history"][-1]
    adapter = None  # LoRA: the kept model's adapter (none when SFT itself is kept)
    if p.guard and best["step"] == 0:  # nothing beat SFT by gold: hand on SFT itself
        log("rlhf: no step beat the SFT model on gold reward; the stage keeps the SFT model")
        policy = load_model(chat_model_dir(run_dir))
    elif p.guard and (out / "best" / "model.safetensors").exists():
        policy = load_model(out / "best")  # merged already
        adapter = out / "best" / "adapter"
    finish_lora(policy, out, chat_model_dir(run_dir))  # the last step's (no guard): merged
    if adapter is not None and adapter.is_dir():
        with replacing(out / "adapter") as tmp:
            for f in adapter.iterdir():
                shutil.copy2(f, tmp / f.name)
    save_model(policy, out)
    # The step was chosen by gold on these prompts and samples, so its own figures flatter it
    # (the best of several noisy measurements): the stage's result is measured afresh, with
    # another sampling seed and more answers per prompt, exactly as DPO's is.
    final = _cached_json(out / "final.json",
                         lambda: gold_win_rate(cfg, run_dir, "rlhf", baseline, log=log,
                                               model_dir=out), log)
    curve = None
    if p.overopt_steps > 0:  # the over-optimisation curve: no KL penalty, no guard, longer
        log(f"rlhf: unguarded run (kl_beta=0, no ptx, {p.overopt_steps} steps planned) for "
            "the over-optimisation curve")
        m = p.overopt_lr_mult
        free = replace(p, kl_beta=0.0, guard=False, ptx_coef=0.0, max_steps=p.overopt_steps,
                       lr_matrix=p.lr_matrix * m, lr_embed=p.lr_embed * m,
                       lr_head=p.lr_head * m, lr_scalar=p.lr_scalar * m)
        curve, _, curve_facts = optimise(cfg, run_dir, stage.folder("rlhf_unguarded"), free,
                                         "rlhf_unguarded", started, budget, sft_eval=ex,
                                         log=log, log_dir=stage.log_dir)
    minutes = round(facts["minutes"] + (time.perf_counter() - guarded_end) / 60, 2)
    result = {**final, "guard_stopped": ex["stopped_by_guard"], "best_step": best["step"],
              "start_fingerprint": file_fingerprint(model_file(run_dir, "sft")),
              "selection": {k: round(best[k], 4) for k in ("gold", "win_rate", "proxy", "kl")},
              "algorithm": p.algorithm, "kl_beta": p.kl_beta, "ptx_coef": p.ptx_coef,
              **facts, "minutes": minutes, "budget_minutes": round(budget / 60, 2),
              "schedule": (f"guarded run: {facts['schedule']}" + (
                  f"; unguarded run: {curve_facts['schedule']}" if curve else "")),
              "history": ex["history"],
              "unguarded_history": curve["history"] if curve else None,
              "unguarded": ({k: curve_facts[k] for k in ("steps", "planned_steps",
                                                          "schedule", "cut_short")}
                            if curve else None)}
    stage.commit(result, {k: v for k, v in result.items()
                          if k not in ("history", "unguarded_history")})
    log(f"rlhf: step {best['step']} kept (0 = SFT itself; gold {best['gold']:.3f} when chosen); "
        f"guard stopped: {result['guard_stopped']}; {facts['schedule']}; {minutes:.1f} min")
    return result


def _cached_json(path: Path, compute, log=print) -> dict:
    """`compute()`'s result, kept in `path` so that a resumed stage does not measure again
    (a corrupt file is measured again, said in the log)."""
    cached = read_cache(path, log)
    if cached is not None:
        return cached
    result = compute()
    atomic_write_json(path, result)
    return result
