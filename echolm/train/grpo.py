"""Stage 4, reinforcement learning on checkable tasks (GRPO and variants).

Each step: draw prompts from the tasks' training split, sample a group of answers to each,
score every answer with the task's verifier, and push up the log-probability of answers that
beat their group's average while pushing down the rest (group-relative advantages; no value
network). Optional: Dr. GRPO (no std scaling, constant normaliser), DAPO (clip-higher, token
averaging, dynamic sampling, overlong penalty), a k3 KL penalty to the starting policy,
several optimisation epochs per batch with importance ratios. Each token's term is weighted
by truncated importance sampling against the log-prob the decoder drew it with (`tis_cap`),
which matters when the update runs in bf16 and the sampler in fp32. pass@k before and after.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from echolm.checkpoint import file_fingerprint, load_model, model_file, save_model
from echolm.config import Config, RLConfig
from echolm.evaluate import one_answer_baseline, task_pass_at_k
from echolm.lora import finish_lora, frozen_reference, start_lora
from echolm.losses import (
    aggregate_tokens,
    clipped_policy_loss,
    group_advantages,
    kl_k3,
    overlong_penalty,
    truncated_is_weights,
)
from echolm.model import Transformer
from echolm.rollout import pad_batch, pad_logprobs, sample_responses, token_logprobs
from echolm.runtime import autocast, resolve_dtype, single_process
from echolm.staging import StageOutput
from echolm.tasks import Problem, Task
from echolm.tasks.spec import problems_up_to, task_from_spec, task_label
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer


@dataclass
class Rollout:
    problem: Problem
    task: Task
    prompt: list[int]
    response: list[int]  # generated ids, including the end-of-turn token if it stopped
    stopped: bool
    sampler_logprobs: list[float]  # of each response id, as the decoder drew it
    reward: float = 0.0


def sample_groups(model: Transformer, tok: Tokenizer, items: list[tuple[Task, Problem]],
                  g: RLConfig, seed: int) -> list[list[Rollout]]:
    """`group_size` sampled answers to every problem, scored by its task."""
    prompts = [tok.render_user(p.prompt) for _, p in items]
    sampled = sample_responses(model, tok, prompts, g.group_size, g.max_tokens, g.temperature,
                               seed, logprobs=True)
    groups: list[list[Rollout]] = [[] for _ in items]
    for i, s in enumerate(sampled):
        k = i // g.group_size
        task, problem = items[k]
        text = tok.decode(s.answer)
        reward = task.score(problem, text)
        if g.format_reward and s.stopped and "Answer:" in text:
            reward += g.format_reward
        groups[k].append(Rollout(problem, task, prompts[k], s.ids, s.stopped, s.logprobs,
                                 reward))
    if g.overlong_buffer > 0:
        for group in groups:
            lengths = torch.tensor([len(r.response) for r in group])
            pen = overlong_penalty(lengths, g.max_tokens, g.overlong_buffer)
            for r, p in zip(group, pen.tolist(), strict=True):
                r.reward += p
    return groups


@dataclass
class PolicyBatch:
    """Everything the policy loss needs for one batch of scored samples."""

    x: Tensor
    y: Tensor
    mask: Tensor
    advantages: Tensor  # one per sequence
    logp_sampler: Tensor  # (B, T) what the decoder drew each response token with
    logp_old: Tensor | None  # None: a single update per batch, ratio taken against itself
    logp_ref: Tensor | None  # None: no KL penalty


def policy_loss(model: torch.nn.Module, item: tuple[PolicyBatch, Tensor], g: RLConfig,
                stats: dict[str, list[float]]) -> Tensor:
    """The GRPO objective on rows `idx` of the batch (+ beta * KL); appends this update's
    diagnostics to `stats` (the step logs their means over its updates)."""
    b, idx = item
    mask = b.mask[idx]
    logp, entropy = token_logprobs(model, b.x[idx], b.y[idx], mask, entropy=True)
    logp_old = b.logp_old[idx] if b.logp_old is not None else logp.detach()
    logp_sampler = b.logp_sampler[idx]
    weights = truncated_is_weights(logp_old, logp_sampler, g.tis_cap) if g.tis_cap else None
    loss, st = clipped_policy_loss(logp, logp_old, b.advantages[idx], mask, g.clip_low,
                                   g.clip_high, g.aggregation, g.max_tokens, weights)
    if b.logp_ref is not None:  # the penalty aggregated as the surrogate is; logged per token
        kl = kl_k3(logp, b.logp_ref[idx])
        loss = loss + g.kl_beta * aggregate_tokens(kl, mask, g.aggregation, g.max_tokens)
        stats.setdefault("kl", []).append(float(aggregate_tokens(kl.detach(), mask)))
    for k in ("clip_frac", "approx_kl"):  # approx_kl: 0 on a step's first update (old = new)
        stats.setdefault(k, []).append(float(st[k]))
    # how far the sampler's numbers are from the trainer's (k3 of KL(sampler || trainer));
    # and the share of tokens truncated importance sampling capped
    stats.setdefault("sampler_kl", []).append(float(aggregate_tokens(
        kl_k3(logp_sampler, logp_old), mask)))
    if weights is not None:
        stats.setdefault("tis_capped", []).append(float(aggregate_tokens(
            (weights >= g.tis_cap).float(), mask)))
    stats.setdefault("entropy", []).append(float(aggregate_tokens(entropy, mask)))
    return loss


def evaluate_rl(model: Transformer, tok: Tokenizer, specs: list[str], g: RLConfig,
                seed: int = 0) -> dict[str, dict]:
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= g.eval_samples})
    out = {}
    for spec in specs:
        task = task_from_spec(spec)
        problems = problems_up_to(task, "val", g.eval_problems, seed)
        out[task_label(spec, specs)] = task_pass_at_k(
            model, tok, task, problems, g.eval_samples, ks, temperature=g.temperature,
            seed=seed, max_tokens=g.max_tokens) | {
                "one_answer": one_answer_baseline(task, problems)}
    return out


def run_rl(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """One step = one batch of `prompts_per_step` groups: sampled, scored, and learned from
    in `epochs x minibatches` optimizer updates."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "rl", force)
    if (finished := stage.finished(log)) is not None:
        return finished
    d = single_process("rl", "generation is not sharded")
    g = cfg.rl
    tok = Tokenizer.load(run_dir / "tokenizer")
    start = model_file(run_dir, g.init).parent
    model = load_model(start, d.device)  # on its device first: the reference copies it
    lora = start_lora(model, g, "rl", log)
    # the KL's reference: with LoRA the policy's base (adapters off), else a frozen copy
    reference = (frozen_reference(model, resolve_dtype(g.dtype, d.device)) if g.kl_beta > 0
                 else None)
    tasks = [task_from_spec(s) for s in g.tasks]
    pool = [(t, p) for t in tasks for p in problems_up_to(t, "train", 5000, g.seed)]

    out = stage.start(log)  # inputs read: only now is anything written
    trainer = Trainer(model, g, out, "rl", stage.log_dir, d, started=started, unit="batch")
    if trainer.resume():
        log(f"rl: resuming from step {trainer.step}")
    else:
        log(f"rl: GRPO from the {g.init} model on {', '.join(g.tasks)}: "
            f"{g.prompts_per_step} prompts x {g.group_size} samples per step; "
            "measuring pass@k first")
        t0 = time.perf_counter()
        trainer.extra["before"] = evaluate_rl(model, tok, g.tasks, g)
        trainer.extra["eval_seconds"] = time.perf_counter() - t0
    # pass@k after RL samples as many answers as before: the schedule leaves that much time
    trainer.plan(reserve_s=trainer.extra.get("eval_seconds", 0.0) * 1.1 + 5.0)
    ctx = autocast(d.device, trainer.dtype)
    while trainer.running():
        step = trainer.step
        rng = random.Random(f"{g.seed}:{step}")  # the batch is a function of (seed, step)
        groups: list[list[Rollout]] = []  # learned from
        seen: list[Rollout] = []  # every answer sampled this step, what the step logs
        n_sampled = n_flat = 0
        for attempt in range(1 + (g.max_refills if g.dynamic_sampling else 0)):
            need = g.prompts_per_step - len(groups)
            items = rng.sample(pool, need) if need <= len(pool) else rng.choices(pool, k=need)
            new = sample_groups(model, tok, items, g, seed=g.seed * 1_000_003 + step * 97
                                + attempt)
            n_sampled += len(new)
            seen += [r for grp in new for r in grp]
            flat = [grp for grp in new if len({r.reward for r in grp}) == 1]
            n_flat += len(flat)
            groups += [grp for grp in new if not (g.dynamic_sampling and grp in flat)]
            if len(groups) >= g.prompts_per_step:
                break
        rollouts = [r for grp in groups for r in grp]
        rec: dict = {"groups_sampled": n_sampled,
                     "zero_variance_frac": round(n_flat / max(n_sampled, 1), 4)}
        if groups:
            rewards = torch.tensor([[r.reward for r in grp] for grp in groups])
            adv = group_advantages(rewards, g.scale_by_std).flatten().to(d.device)
            x, y, mask = (t.to(d.device) for t in pad_batch(
                [r.prompt for r in rollouts], [r.response for r in rollouts], tok.pad))
            sampler = pad_logprobs(mask, [r.sampler_logprobs for r in rollouts])
            with torch.no_grad(), ctx:
                old = (token_logprobs(model, x, y, mask)[0] if g.epochs * g.minibatches > 1
                       else None)
                ref = token_logprobs(reference, x, y, mask)[0] if reference is not None else None
            batch = PolicyBatch(x, y, mask, adv, sampler, old, ref)
            stats: dict[str, list[float]] = {}
            loss_fn = partial(policy_loss, g=g, stats=stats)
            order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(step))
            losses = [trainer.update([(batch, idx)], loss_fn, int(mask[idx].sum()))
                      for _ in range(g.epochs) for idx in order.chunk(g.minibatches)]
            rec["loss"] = sum(losses) / len(losses)
            rec.update({k: round(sum(v) / len(v), 5) for k, v in stats.items()})
        # else: every group was all-right or all-wrong: nothing to learn from this step
        # over every answer sampled, the groups dynamic sampling dropped too: the policy's
        # reward, not the share of it left after dropping the all-right and all-wrong groups
        rewards_all = [r.reward for r in seen]
        rec.update({
            "reward_mean": round(sum(rewards_all) / len(rewards_all), 4),
            "reward_std": round(float(torch.tensor(rewards_all).std()) if len(rewards_all) > 1
                                else 0.0, 4),
            "response_len": round(sum(len(r.response) for r in seen) / len(seen), 2),
            "stopped_frac": round(sum(r.stopped for r in seen) / len(seen), 4),
            "updated": bool(groups)})
        if "sampler_kl" in rec:  # summed over the run (checkpointed: a resume keeps them)
            sums = trainer.extra.setdefault("mismatch", [0.0, 0.0, 0])
            sums[0] += rec["sampler_kl"]
            sums[1] += rec.get("tis_capped", 0.0)
            sums[2] += 1
        trainer.end_step(rec, show=("reward_mean", "response_len", "zero_variance_frac"))
    facts = trainer.finish()
    finish_lora(model, out, start)  # adapter saved, then merged: a plain model from here on

    log("rl: measuring pass@k after RL")
    after = evaluate_rl(model, tok, g.tasks, g)
    before = trainer.extra["before"]
    tasks_summary = {}
    for label, a in after.items():
        b = before[label]
        tasks_summary[label] = {"pass@1_before": round(b["pass@k"]["1"], 4),
                                "pass@1_after": round(a["pass@k"]["1"], 4),
                                "pass@k_before": {k: round(v, 4) for k, v in b["pass@k"].items()},
                                "pass@k_after": {k: round(v, 4) for k, v in a["pass@k"].items()},
                                "n": a["n"], "samples_per_problem": a["samples_per_problem"],
                                "one_answer": a["one_answer"],
                                "temperature": a["temperature"]}
    save_model(model, out)
    facts["minutes"] = round(trainer.clock.seconds() / 60, 2)
    kl_sum, capped_sum, n_steps = trainer.extra.get("mismatch", [0.0, 0.0, 0])
    sampler = {"tis_cap": g.tis_cap, "steps": n_steps,
               "sampler_kl": round(kl_sum / max(n_steps, 1), 6),
               "tis_capped": round(capped_sum / max(n_steps, 1), 6)}
    result = {"tasks": tasks_summary, "init": g.init, "sampler": sampler,
              "start_fingerprint": file_fingerprint(start / "model.safetensors"),
              **facts, "lora": lora,
              "algorithm": {k: getattr(g, k) for k in (
                  "group_size", "prompts_per_step", "scale_by_std", "aggregation", "clip_low",
                  "clip_high", "kl_beta", "tis_cap", "epochs", "minibatches", "dynamic_sampling",
                  "overlong_buffer", "format_reward", "temperature")}}
    stage.commit(result)
    log(f"rl: {facts['schedule']}, {facts['minutes']:.1f} min")
    for label, t in tasks_summary.items():
        log(f"rl: {label}: pass@1 {t['pass@1_before']:.1%} -> {t['pass@1_after']:.1%}, "
            f"pass@{max(t['pass@k_after'], key=int)} "
            f"{t['pass@k_before'][max(t['pass@k_before'], key=int)]:.1%} -> "
            f"{t['pass@k_after'][max(t['pass@k_after'], key=int)]:.1%} (n={t['n']})")
    return result
