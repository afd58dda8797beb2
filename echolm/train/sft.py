"""Stage 3, supervised fine-tuning: the base model studies example conversations and learns to
answer like an assistant. Loss only on the assistant's tokens (and its end-of-turn token).
Held-out accuracy per task family is measured before and after, greedy and sampled."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from echolm.atomic import atomic_write_json
from echolm.checkpoint import load_model, save_model
from echolm.config import Config
from echolm.data.chat import (
    PackedSampler,
    encode_conversations,
    load_conversations,
    problem_messages,
    sft_task_specs,
)
from echolm.evaluate import cached, task_accuracy, wilson_interval
from echolm.lora import finish_lora, start_lora
from echolm.model import Transformer
from echolm.runtime import autocast, check_seq_len, setup_distributed
from echolm.staging import StageOutput
from echolm.tasks.spec import problems_up_to, task_from_spec, task_label
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer

SAMPLED_TEMPERATURE = 0.7


def evaluate_tasks(model: Transformer, tok: Tokenizer, specs: list[str], n: int,
                   weights: Path, run_dir: Path, seed: int = 0) -> dict[str, dict]:
    """Held-out accuracy of every task family, greedy and sampled (fixed seeds), of the model
    saved in `weights` (kept in the run's eval cache, keyed by the file's bytes: `echolm
    eval` reads the greedy ones, also of a --force redo's model, written outside DIR/sft)."""
    cache_dir = run_dir / "eval" / "cache"
    out = {}
    for spec in specs:
        task = task_from_spec(spec)
        problems = problems_up_to(task, "val", n, seed)
        greedy = cached(cache_dir, weights, f"tasks:{spec}:n={n}:seed={seed}:greedy",
                        partial(task_accuracy, model, tok, task, problems, temperature=0.0))
        sampled = cached(cache_dir, weights, f"tasks:{spec}:n={n}:seed={seed}:"
                         f"T={SAMPLED_TEMPERATURE}",
                         partial(task_accuracy, model, tok, task, problems,
                                 temperature=SAMPLED_TEMPERATURE, seed=seed))
        out[task_label(spec, specs)] = {"greedy": greedy["accuracy"],
                                        "sampled": sampled["accuracy"], "n": greedy["n"],
                                        "correct": greedy["correct"],
                                        "examples": greedy["examples"]}
    return out


def _quiet(*_a: object) -> None:
    pass


def run_sft(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """One step = one optimizer update on `micro_batch x grad_accum` packed rows per process."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "sft", force)
    if (finished := stage.finished(log)) is not None:
        return finished
    d = setup_distributed()
    tcfg, data = cfg.sft, cfg.data
    tok = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(run_dir / "base")
    check_seq_len("sft", tcfg.seq_len, model.cfg.max_seq_len)
    lora = start_lora(model, tcfg, "sft", log if d.main else _quiet)

    specs = sft_task_specs(cfg)
    convs = load_conversations(data.sft, specs, data.task_examples, tcfg.seed,
                               data.open_examples, data.pretrain, data.val_fraction)
    examples = encode_conversations(tok, convs, tcfg.seq_len + 1)
    sampler = PackedSampler(examples, tok.pad, tcfg.seq_len, tcfg.micro_batch, tcfg.grad_accum,
                            tcfg.seed, d.rank, d.world)
    # held-out conversations for a validation loss: the task families' val problems
    val_convs = [problem_messages(p) for spec in specs
                 for p in problems_up_to(task_from_spec(spec), "val", 32, seed=1)]
    val_sampler = PackedSampler(encode_conversations(tok, val_convs, tcfg.seq_len + 1), tok.pad,
                                tcfg.seq_len, tcfg.micro_batch, 1, 0)

    out = stage.start(log)  # inputs read: only now is anything written
    trainer = Trainer(model, tcfg, out, "sft", stage.log_dir, d, started=started)
    if trainer.resume():
        log(f"sft: resuming from step {trainer.step}")
    elif d.main:
        log(f"sft: {len(convs):,} conversations -> {len(sampler._rows(0)):,} packed rows of "
            f"{tcfg.seq_len} tokens; evaluating the base model first")
        t0 = time.perf_counter()
        trainer.extra["base_eval"] = evaluate_tasks(model, tok, specs, data.eval_problems,
                                                    run_dir / "base" / "model.safetensors",
                                                    run_dir)
        trainer.extra["eval_seconds"] = time.perf_counter() - t0
    ctx = autocast(d.device, trainer.dtype)

    def loss_fn(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, y, mask = (t.to(d.device) for t in batch)
        return m(x, targets=y, loss_mask=mask)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        with ctx:
            losses = [float(loss_fn(model, b)) for b in val_sampler.micro_batches(0)]
        model.train()
        return sum(losses) / len(losses)

    # the evaluation after training takes about as long as the one before (the base model's
    # answers run longer, so this errs on the safe side); validation runs every eval_every
    if trainer.step == 0 and d.main:
        with trainer.evaluating():
            trainer.metrics.write(step=0, val_loss=round(val_loss(), 5))
    trainer.plan(reserve_s=trainer.extra.get("eval_seconds", 0.0) + 10.0, every=tcfg.eval_every)
    tokens_per_step = tcfg.micro_batch * tcfg.grad_accum * tcfg.seq_len
    while trainer.running():
        loss = trainer.update(sampler.micro_batches(trainer.step), loss_fn, tokens_per_step)
        record: dict = {"loss": loss, "epoch": round(sampler.epoch(trainer.step + 1), 4)}
        if d.main and tcfg.eval_every and (trainer.step + 1) % tcfg.eval_every == 0:
            with trainer.evaluating():
                record["val_loss"] = round(val_loss(), 5)
        trainer.end_step(record, show=("loss", "val_loss"))
    facts = trainer.finish(tcfg.seq_len)

    result: dict = {}
    if d.main:
        log("sft: evaluating the fine-tuned model")
        finish_lora(model, out, run_dir / "base")  # merged: a plain model from here on
        save_model(model, out)
        after = evaluate_tasks(model, tok, specs, data.eval_problems,
                               out / "model.safetensors", run_dir)
        before = trainer.extra["base_eval"]
        tasks = {}
        for label, a in after.items():
            b = before[label]
            tasks[label] = {"base": b["greedy"], "sft": a["greedy"], "n": a["n"],
                            "base_sampled": b["sampled"], "sft_sampled": a["sampled"],
                            "sft_ci95": [round(x, 4) for x in wilson_interval(a["correct"],
                                                                             a["n"])]}
        facts["minutes"] = round(trainer.clock.seconds() / 60, 2)
        result = {"tasks": tasks, "val_loss": round(val_loss(), 4), "conversations": len(convs),
                  **facts, "sampled_temperature": SAMPLED_TEMPERATURE, "lora": lora}
        atomic_write_json(out / "examples.json", {k: v["examples"] for k, v in after.items()})
        stage.commit(result)
        log(f"sft: {facts['schedule']}, {facts['minutes']:.1f} min")
        for label, t in tasks.items():
            log(f"sft: {label:>14}: base {t['base']:.1%} -> sft {t['sft']:.1%} greedy, "
                f"{t['base_sampled']:.1%} -> {t['sft_sampled']:.1%} sampled (n={t['n']})")
    if d.world > 1:
        dist.barrier()
    return result
