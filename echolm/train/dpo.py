"""Stage 5c, direct preference optimisation: tune the SFT model on the rankings directly, no
reward model and no sampling. Every ranking gives pairs (better, worse); the loss raises the
policy's log-probability ratio to the frozen SFT reference on the better answer over the
worse one (DPO, sigmoid) or regresses that gap to 1 / (2 beta) (IPO).

The reference (the SFT model, frozen) scores each batch's answers right before the update,
without gradients: only the pairs a run actually visits are scored (a run fitted to a short
budget visits a fraction of the pairs: scoring all of them first took longer than the
training, 72 s for 5,952 pairs on a 2-core AVX2 CPU). The frozen copy costs the memory of
one more model; with LoRA there is none: the reference is the policy with its adapters off.
Log-probs are computed only where they are needed: the final hidden states of the answer
tokens go through the output head, not those of the prompt. Train / held-out split by
prompt, the same as the reward model's, so both stages leave the same prompts unseen.

Writes DIR/dpo/model.safetensors (a plain model: `echolm chat --stage dpo`; with LoRA the
merged one, and the adapter in DIR/dpo/adapter), metrics.jsonl (per step: implicit-reward
accuracy and margins), and summary.json's `dpo`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from echolm.checkpoint import (
    chat_model_dir,
    file_fingerprint,
    load_model,
    model_file,
    save_model,
)
from echolm.config import Config, DPOConfig
from echolm.data.chat import sft_rows
from echolm.errors import EchoError
from echolm.gold import gold_win_rate, sft_baseline
from echolm.lora import finish_lora, frozen_reference, start_lora
from echolm.losses import chosen_nll, dpo_loss
from echolm.model import Transformer
from echolm.prefs import implied_pairs
from echolm.rankings import (
    RankedExample,
    encode_answer,
    load_rankings,
    split_by_prompt,
    step_indices,
)
from echolm.rollout import pad_batch, token_logprobs
from echolm.runtime import (
    autocast,
    check_seq_len,
    give_back_freed_memory,
    resolve_dtype,
    single_process,
)
from echolm.schedule import capped_steps
from echolm.staging import StageOutput
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer


@dataclass
class PrefPair:
    prompt: str
    chosen: str
    rejected: str
    chosen_ended: bool = True
    rejected_ended: bool = True


def ranking_pairs(rankings: list[RankedExample], temperatures: list[float] | None = None
                  ) -> list[PrefPair]:
    """Every (better, worse) pair the rankings imply; identical answers make no pair. With
    `temperatures`, only pairs of answers both sampled at one of them (an answer whose
    temperature was not recorded always counts)."""
    def kept(t: float | None) -> bool:
        return not temperatures or t is None or any(abs(t - x) < 1e-9 for x in temperatures)

    out = []
    for r in rankings:
        temps = r.temperatures or [None] * len(r.responses)
        out += [PrefPair(r.prompt, r.responses[i], r.responses[j], r.ended[i], r.ended[j])
                for i, j in implied_pairs(r.responses) if kept(temps[i]) and kept(temps[j])]
    return out


@dataclass
class EncodedPair:
    chosen: list[int]  # prompt + answer ids, chat format
    rejected: list[int]
    chosen_prompt: int  # how many leading ids are the prompt (identical unless truncated)
    rejected_prompt: int


def encode_pairs(tok: Tokenizer, pairs: list[PrefPair], seq_len: int) -> list[EncodedPair]:
    """Token ids of every pair, each sequence at most seq_len + 1 ids (seq_len inputs)."""
    out = []
    for p in pairs:
        c, nc = encode_answer(tok, p.prompt, p.chosen, p.chosen_ended, seq_len + 1)
        r, nr = encode_answer(tok, p.prompt, p.rejected, p.rejected_ended, seq_len + 1)
        out.append(EncodedPair(c, r, nc, nr))
    return out


@dataclass
class PairBatch:
    """B pairs as 2B rows: the chosen answers, then the rejected ones (one forward pass)."""

    x: Tensor  # (2B, T) inputs, right-padded
    y: Tensor  # (2B, T) next-token targets
    mask: Tensor  # (2B, T) bool: the target is an answer token
    index: Tensor  # (B,) the pairs' positions in the dataset (for the reference cache)


def make_pair_batch(encoded: list[EncodedPair], index: list[int], pad: int) -> PairBatch:
    """Pairs `index` as one batch: the chosen answers' rows, then the rejected answers';
    targets masked from each answer's first token on (rollout.pad_batch, as RL's)."""
    seqs = [encoded[i].chosen for i in index] + [encoded[i].rejected for i in index]
    starts = ([encoded[i].chosen_prompt for i in index]
              + [encoded[i].rejected_prompt for i in index])
    x, y, mask = pad_batch([s[:n] for s, n in zip(seqs, starts, strict=True)],
                           [s[n:] for s, n in zip(seqs, starts, strict=True)], pad)
    return PairBatch(x, y, mask.bool(), torch.tensor(index, dtype=torch.long))


def sequence_logps(model: Transformer, x: Tensor, y: Tensor, mask: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Summed log-probability (N,) float32 of each row's masked targets, and their count."""
    return token_logprobs(model, x, y, mask)[0].sum(1), mask.bool().sum(1)


@torch.no_grad()
def pair_logps(model: Transformer, encoded: list[EncodedPair], pad: int, ctx=None,
               batch_pairs: int = 16) -> dict[str, Tensor]:
    """`model`'s summed answer log-probs and answer lengths, (n, 2) each (column 0 the chosen
    answer, 1 the rejected), in batches of pairs sorted by length so they pad little."""
    import contextlib

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(encoded)
    logps = torch.zeros(n, 2)
    counts = torch.zeros(n, 2, dtype=torch.long)
    order = sorted(range(n), key=lambda i: max(len(encoded[i].chosen), len(encoded[i].rejected)))
    for k in range(0, n, batch_pairs):
        idx = order[k:k + batch_pairs]
        b = make_pair_batch(encoded, idx, pad)
        with ctx or contextlib.nullcontext():
            lp, cnt = sequence_logps(model, b.x.to(device), b.y.to(device), b.mask.to(device))
        B = len(idx)
        logps[idx, 0], logps[idx, 1] = lp[:B].float().cpu(), lp[B:].float().cpu()
        counts[idx, 0], counts[idx, 1] = cnt[:B].cpu(), cnt[B:].cpu()
    model.train(was_training)
    return {"logps": logps, "counts": counts}


def pair_logratios(logps: Tensor, counts: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) log-probs as the objective uses them: sums for DPO, per-token means
    for IPO (as TRL does: IPO's squared target 1/(2 beta) assumes no length scale)."""
    if kind == "ipo":
        logps = logps / counts.clamp(min=1).to(logps.dtype)
    return logps[..., 0], logps[..., 1]


def as_pairs(logps: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """A batch's per-row log-probs and counts (2B,) (chosen rows, then rejected) as (B, 2)."""
    B = logps.shape[0] // 2
    return (torch.stack([logps[:B], logps[B:]], dim=1),
            torch.stack([counts[:B], counts[B:]], dim=1))


@torch.no_grad()
def reference_logps(reference: Transformer, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """The frozen reference's (B, 2) log-probs and answer lengths of a batch of pairs."""
    return as_pairs(*sequence_logps(reference, batch.x, batch.y, batch.mask))


def dpo_batch_loss(model: Transformer, batch: PairBatch, ref: tuple[Tensor, Tensor],
                   dcfg: DPOConfig, stats: dict[str, float]) -> Tensor:
    """The DPO/IPO loss of one batch of pairs against the reference's (log-probs, counts),
    each (B, 2); fills `stats` (implicit-reward accuracy, margin, chosen/rejected rewards)."""
    pol, cnt = as_pairs(*sequence_logps(model, batch.x, batch.y, batch.mask))
    pc, pr = pair_logratios(pol, cnt, dcfg.loss)
    rc, rr = pair_logratios(ref[0], ref[1], dcfg.loss)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, dcfg.beta, dcfg.loss)
    if dcfg.nll_coef > 0:  # RPO: the chosen answers stay likely
        nll = chosen_nll(pol[:, 0], cnt[:, 0])
        loss = loss + dcfg.nll_coef * nll
        stats["chosen_nll"] = float(nll.detach())
    m = chosen_r - rejected_r
    stats.update(reward_acc=float((m > 0).float().mean()), margin=float(m.mean()),
                 chosen_reward=float(chosen_r.mean()), rejected_reward=float(rejected_r.mean()))
    return loss


@torch.no_grad()
def implicit_rewards(model: Transformer, encoded: list[EncodedPair], ref: dict[str, Tensor],
                     pad: int, dcfg: DPOConfig, ctx=None) -> dict:
    """Implicit-reward accuracy and mean margin of `model` over pairs `encoded`, whose
    reference log-probs are `ref` (`pair_logps` of the reference over the same pairs)."""
    if not encoded:
        return {"reward_accuracy": None, "margin": None, "n_pairs": 0}
    pol = pair_logps(model, encoded, pad, ctx)
    pc, pr = pair_logratios(pol["logps"], pol["counts"], dcfg.loss)
    rc, rr = pair_logratios(ref["logps"], ref["counts"], dcfg.loss)
    _, cr, rj = dpo_loss(pc, pr, rc, rr, dcfg.beta, dcfg.loss)
    m = cr - rj
    return {"reward_accuracy": round(float((m > 0).float().mean()), 4),
            "margin": round(float(m.mean()), 4), "n_pairs": len(encoded),
            "chosen_reward": round(float(cr.mean()), 4),
            "rejected_reward": round(float(rj.mean()), 4)}


MONITOR_PAIRS = 256  # held-out pairs the periodic evaluation reads (all of them at the end)
# training pairs whose implicit rewards are measured at the end, at least (as many as the
# held-out pairs when those are more): train vs held-out accuracy shows overfitting
TRAIN_SAMPLE = 64


def run_dpo(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """One step = one optimizer update on `micro_batch x grad_accum` pairs. Then the implicit
    rewards on the held-out pairs (and as many training pairs, sampled), and the gold win
    rate against SFT on the held-out RLHF prompts (RLHF's final figure, measured the same
    way), all within `dpo.max_minutes`."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "dpo", force)
    if (finished := stage.finished(log)) is not None:
        return finished
    dcfg = tcfg = cfg.dpo
    d = single_process("dpo")
    tok = Tokenizer.load(run_dir / "tokenizer")
    policy = load_model(chat_model_dir(run_dir), d.device)
    lora = start_lora(policy, tcfg, "dpo", log)
    # with LoRA the policy's own base (adapters off, no second copy), else a frozen copy
    reference = frozen_reference(policy, resolve_dtype(tcfg.dtype, d.device))
    check_seq_len("dpo", tcfg.seq_len, policy.cfg.max_seq_len)
    train_r, held_r = split_by_prompt(load_rankings(run_dir, cfg.data.rankings_annotator),
                                     cfg.data.rankings_heldout_fraction)
    train_pairs = ranking_pairs(train_r, dcfg.temperatures)
    held_pairs = ranking_pairs(held_r, dcfg.temperatures)
    if not train_pairs:
        raise EchoError("dpo: the rankings give no pair of different answers to train on")
    train_enc = encode_pairs(tok, train_pairs, tcfg.seq_len)
    tcfg = capped_steps(tcfg, dcfg.epochs, len(train_enc))
    held_enc = encode_pairs(tok, held_pairs, tcfg.seq_len)
    gold = cfg.rlhf.eval_prompts > 0  # the gold win rate against SFT (rlhf's eval settings)

    ctx = autocast(d.device, resolve_dtype(tcfg.dtype, d.device))
    # the reference's side of the held-out pairs, once (timed: the final pass costs as much)
    t0 = time.perf_counter()
    held_ref = pair_logps(reference, held_enc, tok.pad, ctx) if held_enc else None
    held_s = time.perf_counter() - t0
    monitor = held_enc[:MONITOR_PAIRS]
    # SFT's side of the gold figure, first: measuring DPO's side later takes about as long
    # (plus a KL pass, and its answers may run longer: 1.5x), so this times what the budget
    # must keep for it
    baseline = sft_baseline(cfg, run_dir, log) if gold else None

    per_step = tcfg.micro_batch * tcfg.grad_accum
    out = stage.start(log)  # inputs read (the reward model too, when gold): now write
    trainer = Trainer(policy, tcfg, out, "dpo", stage.log_dir, d, started=started)
    if trainer.resume():
        log(f"dpo: resuming from step {trainer.step}")
    else:
        log(f"dpo: {len(train_pairs):,} pairs from {len(train_r)} rankings to train on, "
            f"{len(held_pairs):,} held out by prompt; {dcfg.loss}, beta {dcfg.beta}, "
            f"{tcfg.max_steps} steps planned ({tcfg.max_steps * per_step / len(train_enc):.2f} "
            "epochs)")
    model = trainer.model
    stats: dict[str, list[float]] = {}  # this step's, one value per micro-batch
    avg_len = sum(len(e.chosen) + len(e.rejected) - 2 for e in train_enc) / len(train_enc)

    ptx = sft_rows(cfg, tok, dcfg.ptx_rows) if dcfg.ptx_coef > 0 else None

    def batches(step: int) -> list[tuple[PairBatch, tuple | None]]:
        idx = step_indices(len(train_enc), per_step, step, tcfg.seed)
        return [(make_pair_batch(train_enc, idx[k:k + tcfg.micro_batch], tok.pad),
                 ptx.micro_batches(step * tcfg.grad_accum + k // tcfg.micro_batch)[0]
                 if ptx is not None else None)
                for k in range(0, per_step, tcfg.micro_batch)]

    def loss_fn(_m: torch.nn.Module, item: tuple[PairBatch, tuple | None]) -> Tensor:
        b, rows = item
        b = PairBatch(b.x.to(d.device), b.y.to(d.device), b.mask.to(d.device), b.index)
        micro: dict[str, float] = {}
        loss = dpo_batch_loss(model, b, reference_logps(reference, b), dcfg, micro)
        if rows is not None:  # + the SFT loss on rows of the SFT mixture (see sft_rows)
            x, y, m = (t.to(d.device) for t in rows)
            sft_loss = model(x, targets=y, loss_mask=m)
            micro["ptx_loss"] = float(sft_loss.detach())
            loss = loss + dcfg.ptx_coef * sft_loss
        for k, v in micro.items():
            stats.setdefault(k, []).append(v)
        return loss

    # after training, timed by the reference's pass over the held-out pairs (held_s): the
    # policy's side of the held-out pairs and both models' side of a sample of training pairs
    # (as many, at least TRAIN_SAMPLE); the periodic check reads MONITOR_PAIRS. Then the gold
    # figure: sampling and scoring as SFT's took (its answers may run longer: 1.5x), and its
    # KL pass, both models over every answer (a pair's pass per answer)
    n_train = min(len(train_enc), max(len(held_enc), TRAIN_SAMPLE))
    per_pair_s = held_s / max(len(held_enc), 1)
    monitor_s = per_pair_s * len(monitor)
    final_s = per_pair_s * (len(held_enc) + 2 * n_train)
    gold_s = (1.5 * baseline["seconds"] + per_pair_s * cfg.rlhf.eval_prompts
              * cfg.rlhf.final_samples) if baseline else 0.0
    trainer.plan(reserve_s=final_s + gold_s + 5,
                 periodic_s=monitor_s / tcfg.eval_every if tcfg.eval_every else 0.0,
                 every=tcfg.eval_every)
    monitor_ref = ({k: v[:len(monitor)] for k, v in held_ref.items()} if held_ref else None)
    while trainer.running():
        loss = trainer.update(batches(trainer.step), loss_fn, int(per_step * avg_len))
        record: dict = {"loss": loss, "epoch": round((trainer.step + 1) * per_step
                                                     / len(train_enc), 4),
                        **{k: round(sum(v) / len(v), 5) for k, v in stats.items()}}
        stats.clear()
        if monitor and tcfg.eval_every and (trainer.step + 1) % tcfg.eval_every == 0:
            with trainer.evaluating():
                h = implicit_rewards(model, monitor, monitor_ref, tok.pad, dcfg, ctx)
            record.update(val_reward_acc=h["reward_accuracy"], val_margin=h["margin"])
        trainer.end_step(record, show=("loss", "reward_acc", "val_reward_acc"))
    facts = trainer.finish()  # no MFU: a step also runs the reference and the SFT rows

    log("dpo: measuring implicit rewards")
    held_m = implicit_rewards(model, held_enc, held_ref, tok.pad, dcfg, ctx)
    # training pairs: a seeded sample (n_train, above; all of them when fewer)
    sample = [train_enc[i] for i in step_indices(len(train_enc), n_train, 0, tcfg.seed + 1)]
    train_m = implicit_rewards(model, sample, pair_logps(reference, sample, tok.pad, ctx),
                               tok.pad, dcfg, ctx)
    finish_lora(model, out, chat_model_dir(run_dir))  # last use of the reference was above
    save_model(model, out)
    result = {**train_m, "train_pairs": len(train_enc),
              "start_fingerprint": file_fingerprint(model_file(run_dir, "sft")),
              "heldout_reward_accuracy": held_m["reward_accuracy"],
              "heldout_margin": held_m["margin"], "heldout_n_pairs": held_m["n_pairs"],
              "objective": dcfg.loss, "beta": dcfg.beta,
              "epochs": round(trainer.step * per_step / len(train_enc), 3), **facts,
              "lora": lora,
              "rankings": {"annotator": cfg.data.rankings_annotator,
                           "heldout_fraction": cfg.data.rankings_heldout_fraction}}
    clock = trainer.clock  # the stage's time, earlier runs of it included (a resumed one)
    if baseline is not None:
        # the gold figure loads the saved model, SFT's and the reward model: the trained one,
        # its reference and the heap training kept are not needed any more
        del model, policy, reference, trainer
        give_back_freed_memory()
        result.update(gold_win_rate(cfg, run_dir, "dpo", baseline, log=log, model_dir=out))
    result["minutes"] = round(clock.seconds() / 60, 2)
    stage.commit(result)
    held = held_m["reward_accuracy"]
    log(f"dpo: implicit-reward accuracy {train_m['reward_accuracy']:.1%} on {len(sample):,} "
        f"sampled training pairs (margin {train_m['margin']:.3f}), "
        f"{'n/a' if held is None else f'{held:.1%}'} on {len(held_enc):,} held-out pairs; "
        f"{facts['schedule']}, {result['minutes']:.1f} min")
    return result
