"""Stage 5a, the reward model: the SFT model with a scalar head, trained on people's rankings
(DIR/prefs.sqlite) to score how good an answer to a prompt is.

A ranking of K answers to one prompt (best first) is used whole: every answer is read once
and the loss covers every pair the ranking implies (Bradley-Terry, InstructGPT's way of
using K-way rankings without over-fitting to repeated answers) or the full order
(Plackett-Luce). Optional: a Llama-2-style margin, reward centering (Eisenstein et al.).
Rankings are split into train and held-out BY PROMPT, so the held-out accuracy measures
answers to questions the model never saw ranked. After training the score is shifted so the
mean over training answers is 0 (InstructGPT normalised its reward model the same way).

The model itself (and how RLHF reads it) is in reward.py; the ranking data in rankings.py.
Writes DIR/rm/model.safetensors (backbone + `score_head.weight` (1, n_embd) and
`score_head.bias` (1,)), config.json, reward_model.json (what the scores mean), scores.json
(held-out scores, reliability bins), DIR/report/rm_scores.png, and summary.json's `rm`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from echolm.checkpoint import (
    atomic_write_json,
    chat_model_dir,
    save_model,
)
from echolm.config import Config, RMConfig
from echolm.losses import (
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_loss,
)
from echolm.prefs import implied_pairs
from echolm.rankings import (
    RankedExample,
    encode_answer,
    load_rankings,
    split_by_prompt,
    step_indices,
)
from echolm.reward import META_FILE, RewardModel, reward_model_from_backbone
from echolm.rollout import pad_right
from echolm.runtime import autocast, check_seq_len, single_process
from echolm.schedule import capped_steps
from echolm.staging import StageOutput
from echolm.tokenizer import Tokenizer
from echolm.trainer import Trainer

# ---- training batches --------------------------------------------------------------------


@dataclass
class RankBatch:
    """Rankings of one micro-batch, every answer one row of x."""

    x: Tensor  # (N, T) right-padded answers of all rankings
    last: Tensor  # (N,) position of each row's last token
    index: Tensor  # (B, K) row of x of each ranking's i-th best answer (0 where masked)
    mask: Tensor  # (B, K) bool: real answer
    chosen: Tensor  # (P,) rows of x: the better answer of each implied pair
    rejected: Tensor  # (P,) rows of x: the worse one
    weight: Tensor  # (P,) 1 / (pairs of its ranking) / B: every ranking weighs the same
    n_tokens: int = 0


def make_rank_batch(encoded: list[list[list[int]]], pad: int) -> RankBatch:
    """`encoded[b]` is ranking b's answers (token ids, best first)."""
    rows = [s for r in encoded for s in r]
    K = max(len(r) for r in encoded)
    index = torch.zeros(len(encoded), K, dtype=torch.long)
    mask = torch.zeros(len(encoded), K, dtype=torch.bool)
    chosen, rejected, weight = [], [], []
    start = 0
    for b, r in enumerate(encoded):
        index[b, :len(r)] = torch.arange(start, start + len(r))
        mask[b, :len(r)] = True
        pairs = implied_pairs(r)
        for i, j in pairs:
            chosen.append(start + i)
            rejected.append(start + j)
            weight.append(1.0 / len(pairs) / len(encoded))
        start += len(r)
    return RankBatch(pad_right(rows, pad), torch.tensor([len(s) - 1 for s in rows]), index,
                     mask, torch.tensor(chosen, dtype=torch.long),
                     torch.tensor(rejected, dtype=torch.long),
                     torch.tensor(weight, dtype=torch.float32), sum(map(len, rows)))


def rm_loss(model: nn.Module, batch: RankBatch, rcfg: RMConfig,
            stats: dict[str, float]) -> Tensor:
    """Bradley-Terry over every implied pair (each ranking weighing the same) or
    Plackett-Luce over the full order, plus reward centering; fills `stats`."""
    device = batch.x.device
    s = model(batch.x, batch.last)
    sc, sr = s[batch.chosen], s[batch.rejected]
    if rcfg.loss == "pl":
        loss = plackett_luce_loss(s[batch.index], batch.mask)
    else:
        per_pair = bradley_terry_loss(sc, sr, rcfg.margin or None, reduction="none")
        loss = (per_pair * batch.weight.to(device)).sum()
    if rcfg.center_coef > 0 and len(sc):
        loss = loss + reward_centering_loss(sc, sr, rcfg.center_coef)
    if len(sc):
        d = (sc - sr).detach()
        stats["acc"] = float((d > 0).float().mean() + 0.5 * (d == 0).float().mean())
        stats["margin"] = float(d.mean())
        stats["score_mean"] = float(s.detach().mean())
    return loss


class RankingSampler:
    """Micro-batches of rankings (see `step_indices`)."""

    def __init__(self, encoded: list[list[list[int]]], pad: int, micro_batch: int,
                 grad_accum: int, seed: int) -> None:
        self.encoded, self.pad, self.mb, self.accum, self.seed = (encoded, pad, micro_batch,
                                                                 grad_accum, seed)

    def micro_batches(self, step: int) -> list[RankBatch]:
        idx = step_indices(len(self.encoded), self.mb * self.accum, step, self.seed)
        return [make_rank_batch([self.encoded[i] for i in idx[k:k + self.mb]], self.pad)
                for k in range(0, len(idx), self.mb)]

    def epoch(self, step: int) -> float:
        return step * self.mb * self.accum / len(self.encoded)


# ---- evaluation --------------------------------------------------------------------------


def pair_metrics(chosen: Tensor, rejected: Tensor, bins: int = 10) -> dict:
    """Pairwise accuracy (ties count half), BT loss, and calibration of the model's
    probability that the chosen answer wins, sigmoid(r_c - r_r): confidence max(p, 1 - p) in
    `bins` equal bins over [0.5, 1], each bin's accuracy (how often the favoured answer was the
    chosen one) against its mean confidence; ECE = sum over bins of share * |acc - conf|."""
    n = len(chosen)
    if n == 0:
        return {"accuracy": None, "n": 0, "loss": None, "ece": None, "bins": []}
    d = (chosen - rejected).double()
    p = torch.sigmoid(d)
    conf = torch.maximum(p, 1 - p)
    right = torch.where(d == 0, torch.full_like(d, 0.5), (d > 0).double())
    which = ((conf - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        k = int(sel.sum())
        if k == 0:
            continue
        acc, c = float(right[sel].mean()), float(conf[sel].mean())
        ece += k / n * abs(acc - c)
        table.append({"lo": 0.5 + b / (2 * bins), "hi": 0.5 + (b + 1) / (2 * bins), "n": k,
                      "confidence": round(c, 4), "accuracy": round(acc, 4)})
    return {"accuracy": round(float(right.mean()), 4), "n": n,
            "loss": round(float(bradley_terry_loss(d, torch.zeros_like(d))), 4),
            "ece": round(ece, 4), "bins": table}


def score_rankings(rm: RewardModel, encoded: list[list[list[int]]]) -> list[list[float]]:
    flat = rm.score_ids([s for r in encoded for s in r]).tolist()
    out, k = [], 0
    for r in encoded:
        out.append(flat[k:k + len(r)])
        k += len(r)
    return out


def ranking_pairs(encoded: list[list[list[int]]], scores: list[list[float]]
                  ) -> tuple[Tensor, Tensor]:
    """Scores of the better and worse answer of every pair the rankings imply."""
    c, r = [], []
    for seqs, s in zip(encoded, scores, strict=True):
        for i, j in implied_pairs(seqs):
            c.append(s[i])
            r.append(s[j])
    return torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)


def plot_scores(scores: dict, metrics: dict, path: Path) -> Path:
    """Held-out score distributions (best- vs worst-ranked answers) and the reliability
    diagram of the pairwise probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    best = [s[0] for s in scores["heldout_rankings"]]
    worst = [s[-1] for s in scores["heldout_rankings"]]
    if best:
        lo, hi = min(best + worst), max(best + worst)
        edges = np.linspace(lo - 1e-6, hi + 1e-6, 21)
        ax1.hist(best, bins=edges, alpha=0.6, label=f"ranked best (n={len(best)})")
        ax1.hist(worst, bins=edges, alpha=0.6, label=f"ranked worst (n={len(worst)})")
        ax1.legend()
    ax1.set(xlabel="reward-model score", ylabel="answers", title="Held-out scores")
    ax2.plot([0.5, 1], [0.5, 1], ls="--", color="grey", lw=1)
    bins = metrics.get("bins") or []
    if bins:
        ax2.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    ece = metrics.get("ece")
    ax2.set(xlabel="predicted P(favoured answer is preferred)", ylabel="observed accuracy",
            title="Calibration" + (f" (ECE {ece:.3f})" if ece is not None else ""),
            xlim=(0.5, 1), ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- the stage ---------------------------------------------------------------------------


@dataclass
class RMData:
    train: list[RankedExample]
    heldout: list[RankedExample]
    train_ids: list[list[list[int]]] = field(default_factory=list)
    heldout_ids: list[list[list[int]]] = field(default_factory=list)


def prepare_rm_data(cfg: Config, run_dir: Path, tok: Tokenizer, max_len: int) -> RMData:
    ranks = load_rankings(run_dir, cfg.data.rankings_annotator)
    train, held = split_by_prompt(ranks, cfg.data.rankings_heldout_fraction)

    def enc(rs: list[RankedExample]) -> list[list[list[int]]]:
        return [[encode_answer(tok, r.prompt, a, e, max_len)[0]
                 for a, e in zip(r.responses, r.ended, strict=True)] for r in rs]

    return RMData(train, held, enc(train), enc(held))


def run_rm(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    """One step = one optimizer update on `micro_batch x grad_accum` rankings."""
    started = time.perf_counter()
    stage = StageOutput(run_dir, "rm", force)
    if (finished := stage.finished(log)) is not None:
        return finished
    rcfg = tcfg = cfg.rm
    d = single_process("rm")
    tok = Tokenizer.load(run_dir / "tokenizer")
    rm = reward_model_from_backbone(chat_model_dir(run_dir))
    check_seq_len("rm", tcfg.seq_len, rm.cfg.max_seq_len)
    rm.max_len = tcfg.seq_len
    data = prepare_rm_data(cfg, run_dir, tok, tcfg.seq_len)
    tcfg = capped_steps(tcfg, rcfg.epochs, len(data.train))
    sampler = RankingSampler(data.train_ids, tok.pad, tcfg.micro_batch, tcfg.grad_accum,
                             tcfg.seed)
    n_answers = sum(len(r) for r in data.train_ids)
    avg_len = sum(len(s) for r in data.train_ids for s in r) / max(n_answers, 1)

    out = stage.start(log)  # inputs read: only now is anything written
    trainer = Trainer(rm, tcfg, out, "rm", stage.log_dir, d, started=started)
    if trainer.resume():
        log(f"rm: resuming from step {trainer.step}")
    else:
        log(f"rm: {len(data.train)} rankings ({n_answers} answers) to train on, "
            f"{len(data.heldout)} held out by prompt; loss {rcfg.loss}, {tcfg.max_steps} "
            f"steps ({sampler.epoch(tcfg.max_steps):.1f} epochs)")
    rm = trainer.model
    stats: dict[str, float] = {}
    ctx = autocast(d.device, trainer.dtype)

    def loss_fn(m: nn.Module, b: RankBatch) -> Tensor:
        b = RankBatch(b.x.to(d.device), b.last.to(d.device), b.index.to(d.device),
                      b.mask.to(d.device), b.chosen.to(d.device), b.rejected.to(d.device),
                      b.weight, b.n_tokens)
        return rm_loss(m, b, rcfg, stats)

    def heldout_metrics() -> dict:
        with ctx:
            scores = score_rankings(rm, data.heldout_ids)
        return pair_metrics(*ranking_pairs(data.heldout_ids, scores))

    # held-out accuracy before training, timed: the periodic evaluations take as long, and
    # scoring every answer after training (n_all of them) that much per held-out answer
    if data.heldout and trainer.step == 0:
        with trainer.evaluating():
            m0 = heldout_metrics()
        trainer.metrics.write(step=0, val_acc=m0["accuracy"], val_loss=m0["loss"])
    eval_s = trainer.eval_times[-1] if trainer.eval_times else 0.0
    n_all = len(data.train_ids) + len(data.heldout_ids)
    trainer.plan(reserve_s=eval_s * n_all / max(len(data.heldout_ids), 1) + 5.0,
                 every=tcfg.eval_every)
    tokens_per_step = int(tcfg.micro_batch * tcfg.grad_accum * avg_len
                          * n_answers / max(len(data.train_ids), 1))
    while trainer.running():
        loss = trainer.update(sampler.micro_batches(trainer.step), loss_fn, tokens_per_step)
        record: dict = {"loss": loss, "epoch": round(sampler.epoch(trainer.step + 1), 4),
                        **{k: round(v, 4) for k, v in stats.items()}}
        if data.heldout and tcfg.eval_every and (trainer.step + 1) % tcfg.eval_every == 0:
            with trainer.evaluating():
                m = heldout_metrics()
            record.update(val_acc=m["accuracy"], val_loss=m["loss"])
        trainer.end_step(record, show=("loss", "val_acc"))
    facts = trainer.finish()

    log("rm: scoring the training and held-out answers")
    with ctx:
        train_scores = score_rankings(rm, data.train_ids)
        offset = float(np.mean([s for r in train_scores for s in r]))
        with torch.no_grad():  # normalise: an average training answer scores 0
            rm.score_head.bias -= offset
        train_scores = [[s - offset for s in r] for r in train_scores]
        held_scores = score_rankings(rm, data.heldout_ids)
    train_m = pair_metrics(*ranking_pairs(data.train_ids, train_scores))
    held_m = pair_metrics(*ranking_pairs(data.heldout_ids, held_scores))
    hc, hr = ranking_pairs(data.heldout_ids, held_scores)
    save_model(rm, out)
    meta = {"kind": "reward_model", "backbone": "sft", "max_len": tcfg.seq_len,
            "head": "score_head: final hidden state at the last token -> scalar",
            "last_token": "<|assistant_end|> if the answer ended its turn, else its last token",
            "normalisation": "bias shifted so the mean training-answer score is 0",
            "offset_removed": round(offset, 6),
            "objective": {k: v for k, v in asdict(rcfg).items()
                          if k in ("loss", "margin", "center_coef", "epochs")},
            "rankings": {"annotator": cfg.data.rankings_annotator,
                         "heldout_fraction": cfg.data.rankings_heldout_fraction}}
    atomic_write_json(out / META_FILE, meta)
    scores = {"heldout": {"chosen": [round(v, 5) for v in hc.tolist()],
                          "rejected": [round(v, 5) for v in hr.tolist()]},
              "heldout_rankings": [[round(v, 5) for v in r] for r in held_scores],
              "heldout_prompts": [r.prompt for r in data.heldout],
              "train_score_mean": 0.0,
              "train_score_std": round(float(np.std([s for r in train_scores for s in r])), 5),
              "reliability": held_m["bins"], "ece": held_m["ece"]}
    atomic_write_json(out / "scores.json", scores)
    result = {"heldout_accuracy": held_m["accuracy"], "n": held_m["n"], "ece": held_m["ece"],
              "loss": held_m["loss"], "train_accuracy": train_m["accuracy"],
              "train_pairs": train_m["n"], "heldout_rankings": len(data.heldout),
              "train_rankings": len(data.train), "objective": rcfg.loss, **facts,
              "minutes": round(trainer.clock.seconds() / 60, 2)}
    stage.commit(result)
    figure = plot_scores(scores, held_m, run_dir / "report" / "rm_scores.png")  # the new model's
    acc = held_m["accuracy"]
    log(f"rm: held-out pairwise accuracy "
        f"{'n/a' if acc is None else f'{acc:.1%}'} over {held_m['n']} pairs "
        f"(train {train_m['accuracy']:.1%}), ECE {held_m['ece']}; figure {figure}")
    return result
