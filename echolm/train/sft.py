"""Stage 3, supervised fine-tuning: the base model studies example conversations and learns to
answer like an assistant. Loss only on the assistant's tokens (and its end-of-turn token).
Held-out accuracy per task family is measured before and after, greedy and sampled."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from echolm.checkpoint import atomic_write_json, load_model, save_model
from echolm.config import Config
from echolm.data.chat import (
    PackedSampler,
    encode_conversations,
    load_conversations,
    problem_messages,
    problems_up_to,
    task_from_spec,
    task_label,
)
from echolm.evaluate import task_accuracy, wilson_interval
from echolm.model import Transformer
from echolm.summary import update_summary
from echolm.tokenizer import Tokenizer
from echolm.train.loop import (
    Trainer,
    autocast,
    check_seq_len,
    finished_stage,
    setup_distributed,
)

SAMPLED_TEMPERATURE = 0.7


def evaluate_tasks(model: Transformer, tok: Tokenizer, specs: list[str], n: int,
                   seed: int = 0) -> dict[str, dict]:
    """Held-out accuracy of every task family, greedy and sampled (fixed seeds)."""
    out = {}
    for spec in specs:
        task = task_from_spec(spec)
        problems = problems_up_to(task, "val", n, seed)
        greedy = task_accuracy(model, tok, task, problems, temperature=0.0)
        sampled = task_accuracy(model, tok, task, problems, temperature=SAMPLED_TEMPERATURE,
                                seed=seed)
        out[task_label(spec, specs)] = {"greedy": greedy["accuracy"],
                                        "sampled": sampled["accuracy"], "n": greedy["n"],
                                        "correct": greedy["correct"],
                                        "examples": greedy["examples"]}
    return out


def sft_rows(cfg: Config, tok: Tokenizer, rows: int) -> PackedSampler:
    """Rows of the SFT mixture, `rows` per micro-batch, for RLHF's and DPO's "ptx" term
    (InstructGPT's PPO-ptx): a reward model or a preference signal that cannot check an answer
    (a 5M model's cannot check a sum) lets the policy drift from right answers while it gains
    elsewhere; the SFT likelihood keeps what SFT taught. A different order from SFT's own."""
    data, sft = cfg.data, cfg.sft
    convs = load_conversations(data.sft, data.tasks, data.task_examples, sft.seed,
                               data.open_examples, data.pretrain, data.val_fraction)
    return PackedSampler(encode_conversations(tok, convs, sft.seq_len + 1), tok.pad,
                         sft.seq_len, rows, 1, sft.seed + 1)


def run_sft(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    out, done = run_dir / "sft", run_dir / "sft" / "done.json"
    if (finished := finished_stage(out, "sft", force, log)) is not None:
        return finished
    d = setup_distributed()
    tcfg, data = cfg.sft, cfg.data
    tok = Tokenizer.load(run_dir / "tokenizer")
    model = load_model(run_dir / "base")
    check_seq_len("sft", tcfg.seq_len, model.cfg.max_seq_len)

    convs = load_conversations(data.sft, data.tasks, data.task_examples, tcfg.seed,
                               data.open_examples, data.pretrain, data.val_fraction)
    examples = encode_conversations(tok, convs, tcfg.seq_len + 1)
    sampler = PackedSampler(examples, tok.pad, tcfg.seq_len, tcfg.micro_batch, tcfg.grad_accum,
                            tcfg.seed, d.rank, d.world)
    # held-out conversations for a validation loss: the task families' val problems
    val_convs = [problem_messages(p) for spec in data.tasks
                 for p in problems_up_to(task_from_spec(spec), "val", 32, seed=1)]
    val_sampler = PackedSampler(encode_conversations(tok, val_convs, tcfg.seq_len + 1), tok.pad,
                                tcfg.seq_len, tcfg.micro_batch, 1, 0)

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, tcfg, out, "sft", run_dir, d)
    if trainer.resume():
        log(f"sft: resuming from step {trainer.step_idx}")
    elif d.main:
        log(f"sft: {len(convs):,} conversations -> {len(sampler._rows(0)):,} packed rows of "
            f"{tcfg.seq_len} tokens; evaluating the base model first")
        trainer.extra["base_eval"] = evaluate_tasks(model, tok, data.tasks, data.eval_problems)
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

    def periodic(step: int) -> dict:
        if d.main and tcfg.eval_every and step % tcfg.eval_every == 0:
            return {"val_loss": round(val_loss(), 5)}
        return {}

    tokens_per_step = tcfg.micro_batch * tcfg.grad_accum * tcfg.seq_len
    trainer.fit(sampler.micro_batches, loss_fn, tokens_per_step, periodic, sampler.epoch)

    result: dict = {}
    if d.main:
        log("sft: evaluating the fine-tuned model")
        after = evaluate_tasks(model, tok, data.tasks, data.eval_problems)
        before = trainer.extra["base_eval"]
        tasks = {}
        for label, a in after.items():
            b = before[label]
            tasks[label] = {"base": b["greedy"], "sft": a["greedy"], "n": a["n"],
                            "base_sampled": b["sampled"], "sft_sampled": a["sampled"],
                            "sft_ci95": [round(x, 4) for x in wilson_interval(a["correct"],
                                                                             a["n"])]}
        save_model(model, out)
        result = {"tasks": tasks, "val_loss": round(val_loss(), 4), "steps": trainer.step_idx,
                  "conversations": len(convs), "minutes": round(trainer.elapsed / 60, 2),
                  "sampled_temperature": SAMPLED_TEMPERATURE}
        atomic_write_json(out / "examples.json", {k: v["examples"] for k, v in after.items()})
        update_summary(run_dir, "sft", result)
        atomic_write_json(done, result)
        for label, t in tasks.items():
            log(f"sft: {label:>14}: base {t['base']:.1%} -> sft {t['sft']:.1%} greedy, "
                f"{t['base_sampled']:.1%} -> {t['sft_sampled']:.1%} sampled (n={t['n']})")
    if d.world > 1:
        dist.barrier()
    return result
