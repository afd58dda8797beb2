"""Stage 5a, the reward model: the SFT model with a scalar head, trained on people's rankings
(DIR/prefs.sqlite) to score how good an answer to a prompt is.

A ranking of K answers to one prompt (best first) is used whole: every answer is read once
and the loss covers every pair the ranking implies (Bradley-Terry, InstructGPT's way of
using K-way rankings without over-fitting to repeated answers) or the full order
(Plackett-Luce). Optional: a Llama-2-style margin, reward centering (Eisenstein et al.).
Rankings are split into train and held-out BY PROMPT, so the held-out accuracy measures
answers to questions the model never saw ranked. After training the score is shifted so the
mean over training answers is 0 (InstructGPT normalised its reward model the same way).

Public API, used by the RLHF stage (keep stable):

    rm = load_reward_model(run_dir / "rm")               # -> RewardModel (eval mode)
    rm.score(tok, prompts, responses)                    # -> float32 CPU tensor (N,)
    rm.score(tok, prompts, responses, ended=[...])       # answers cut off by a length limit

Writes DIR/rm/model.safetensors (backbone + `score_head.weight` (1, n_embd) and
`score_head.bias` (1,)), config.json, reward_model.json (what the scores mean), scores.json
(held-out scores, reliability bins), DIR/report/rm_scores.png, and summary.json's `rm`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from echolm.checkpoint import (
    atomic_write_json,
    load_model_config,
    read_weights,
    save_model,
)
from echolm.config import Config, ModelConfig, PreferenceConfig, TrainConfig
from echolm.errors import EchoError
from echolm.losses import (
    bradley_terry_loss,
    plackett_luce_loss,
    reward_centering_loss,
)
from echolm.model import Transformer, rope_tables
from echolm.prefs import PreferenceStore
from echolm.summary import update_summary
from echolm.tokenizer import Tokenizer
from echolm.train.loop import (
    Trainer,
    autocast,
    check_seq_len,
    finished_stage,
    single_process,
)

META_FILE = "reward_model.json"


# ---- preference data (shared with DPO) ---------------------------------------------------


@dataclass
class RankedExample:
    """One ranking: a prompt (one user message) and its answers, best first. `ended[i]` is
    False for an answer that was cut off before it ended its turn (the store's sampling record
    says ``"stopped": false``); such an answer is read without <|assistant_end|>."""

    prompt: str
    responses: list[str]
    ended: list[bool]
    annotator: str = ""


def load_rankings(run_dir: Path, pref: PreferenceConfig) -> list[RankedExample]:
    """Every ranking in DIR/prefs.sqlite (optionally one annotator's)."""
    path = run_dir / "prefs.sqlite"
    if not path.exists():
        raise EchoError(f"{path}: no preference store (rank answers first: `echolm rank`)")
    store = PreferenceStore(path)
    try:
        out = []
        for r in store.rankings(pref.annotator or None):
            meta = {x["id"]: x["sampling"] for x in store.responses(r.prompt_id)}
            ended = [bool(meta.get(i, {}).get("stopped", True)) for i in r.response_ids]
            out.append(RankedExample(r.prompt, r.responses, ended, r.annotator))
    finally:
        store.close()
    if not out:
        who = f" by annotator '{pref.annotator}'" if pref.annotator else ""
        raise EchoError(f"{path}: no rankings{who} yet (rank answers first: `echolm rank`)")
    return out


def split_by_prompt(items: list, fraction: float, seed: int = 0,
                    key=lambda r: r.prompt) -> tuple[list, list]:
    """(train, held-out): a seeded share `fraction` of the distinct prompts is held out, with
    every ranking of them (several annotators' rankings of one prompt stay together)."""
    prompts = sorted({key(r) for r in items})
    random.Random(seed).shuffle(prompts)
    n_held = math.ceil(fraction * len(prompts)) if fraction > 0 and len(prompts) > 1 else 0
    held = set(prompts[:min(n_held, len(prompts) - 1)])
    return [r for r in items if key(r) not in held], [r for r in items if key(r) in held]


def heldout_prompts(run_dir: Path, pref: PreferenceConfig) -> list[str]:
    """The prompts the reward model and DPO never train on (for a fair gold evaluation)."""
    return sorted({r.prompt for r in split_by_prompt(load_rankings(run_dir, pref),
                                                      pref.heldout_fraction)[1]})


def encode_answer(tok: Tokenizer, prompt: str, response: str, ended: bool = True,
                  max_len: int | None = None) -> tuple[list[int], int]:
    """Ids of the prompt and answer in the chat format (<|assistant_end|> only if the answer
    ended its turn), and how many of them are the prompt. Too long for `max_len`: the prompt
    loses tokens from its start, then (if the answer alone is too long) the answer its end."""
    p = tok.render_prompt([{"role": "user", "content": prompt}])
    r = tok.encode(response) + ([tok.assistant_end] if ended else [])
    if max_len is not None and len(p) + len(r) > max_len:
        keep = max(1, max_len - len(r))  # always keep <|assistant_start|>
        p = p[len(p) - keep:]
        r = r[:max_len - len(p)]
    return p + r, len(p)


def pad_right(seqs: list[list[int]], pad: int) -> Tensor:
    x = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return x


# ---- the model ---------------------------------------------------------------------------


class RewardModel(Transformer):
    """The transformer with its language-model head replaced by a scalar score head read at
    the last token of prompt + answer (<|assistant_end|> for a finished answer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head  # no next-token logits: the score head reads the final hidden state
        self.score_head = nn.Linear(cfg.n_embd, 1, bias=True)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)
        self.max_len = cfg.max_seq_len  # longest prompt + answer `score` reads

    def forward(self, idx: Tensor, last: Tensor) -> Tensor:  # type: ignore[override]
        """Scores (B,) float32 of right-padded rows idx (B, T) whose last real token is at
        position last[b]."""
        h = self.hidden_states(idx)
        h = h[torch.arange(idx.shape[0], device=idx.device), last]
        with torch.autocast(idx.device.type, enabled=False):  # the score in full precision
            return self.score_head(h.float()).squeeze(-1)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]], batch_size: int = 32) -> Tensor:
        """Scores (N,) float32 on the CPU of token sequences (prompt + answer, chat format).
        Sorted by length into batches so padding costs little; eval mode for the call."""
        if not seqs:
            return torch.zeros(0)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.zeros(len(seqs))
        pad = 0
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            x = pad_right([seqs[i] for i in idx], pad).to(device)
            last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=device)
            out[idx] = self(x, last).cpu()
        self.train(was_training)
        return out

    def score(self, tok: Tokenizer, prompts: list[str], responses: list[str],
              ended: list[bool] | None = None, batch_size: int = 32) -> Tensor:
        """How good each answer is: float32 CPU tensor (N,), higher is better, 0 = an average
        training answer. prompts[i] is one user message, responses[i] the assistant's answer
        (plain text, no special tokens); ended[i] False marks an answer cut off before it
        ended its turn (default: all ended). Batched; no gradients; does not change modes."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        ended = [True] * len(prompts) if ended is None else ended
        seqs = [encode_answer(tok, p, r, e, self.max_len)[0]
                for p, r, e in zip(prompts, responses, ended, strict=True)]
        return self.score_ids(seqs, batch_size)


def _empty_reward_model(cfg: ModelConfig, device: str | torch.device) -> RewardModel:
    with torch.device("meta"):
        rm = RewardModel(cfg)
    rm = rm.to_empty(device=device)
    rm.rope_cos, rm.rope_sin = (t.to(device) for t in rope_tables(cfg, cfg.max_seq_len))
    return rm


def reward_model_from_backbone(folder: Path, device: str | torch.device = "cpu"
                               ) -> RewardModel:
    """A reward model whose backbone is the model saved in `folder` (e.g. DIR/sft), score
    head zero (every answer scores 0 at first)."""
    cfg = load_model_config(folder)
    sd = read_weights(folder / "model.safetensors", device)
    sd.pop("lm_head.weight", None)
    rm = _empty_reward_model(cfg, device)
    sd["score_head.weight"] = torch.zeros(1, cfg.n_embd, device=device)
    sd["score_head.bias"] = torch.zeros(1, device=device)
    try:
        rm.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise EchoError(f"{folder}: not a model this reward model can start from ({msg})"
                        ) from None
    return rm


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """The reward model saved in `folder` (DIR/rm), in eval mode."""
    folder = Path(folder)
    cfg = load_model_config(folder)
    sd = read_weights(folder / "model.safetensors", device)
    if "score_head.weight" not in sd:
        raise EchoError(f"{folder}: not a reward model (no score_head in model.safetensors)")
    rm = _empty_reward_model(cfg, device)
    try:
        rm.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise EchoError(f"{folder / 'model.safetensors'}: does not match config.json ({msg})"
                        ) from None
    meta_path = folder / META_FILE
    if meta_path.exists():
        rm.max_len = int(json.loads(meta_path.read_text()).get("max_len", rm.max_len))
    return rm.eval()


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
        pairs = [(i, j) for i in range(len(r)) for j in range(i + 1, len(r)) if r[i] != r[j]]
        for i, j in pairs:
            chosen.append(start + i)
            rejected.append(start + j)
            weight.append(1.0 / len(pairs) / len(encoded))
        start += len(r)
    return RankBatch(pad_right(rows, pad), torch.tensor([len(s) - 1 for s in rows]), index,
                     mask, torch.tensor(chosen, dtype=torch.long),
                     torch.tensor(rejected, dtype=torch.long),
                     torch.tensor(weight, dtype=torch.float32), sum(map(len, rows)))


def rm_loss(model: nn.Module, batch: RankBatch, pref: PreferenceConfig,
            stats: dict[str, float]) -> Tensor:
    """Bradley-Terry over every implied pair (each ranking weighing the same) or
    Plackett-Luce over the full order, plus reward centering; fills `stats`."""
    device = batch.x.device
    s = model(batch.x, batch.last)
    sc, sr = s[batch.chosen], s[batch.rejected]
    if pref.rm_loss == "pl":
        loss = plackett_luce_loss(s[batch.index], batch.mask)
    else:
        per_pair = bradley_terry_loss(sc, sr, pref.margin or None, reduction="none")
        loss = (per_pair * batch.weight.to(device)).sum()
    if pref.center_coef > 0 and len(sc):
        loss = loss + reward_centering_loss(sc, sr, pref.center_coef)
    if len(sc):
        d = (sc - sr).detach()
        stats["acc"] = float((d > 0).float().mean() + 0.5 * (d == 0).float().mean())
        stats["margin"] = float(d.mean())
        stats["score_mean"] = float(s.detach().mean())
    return loss


def step_indices(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Which of `n` examples step `step` trains on: a seeded permutation per epoch, consumed
    in order, `per_step` at a time. A function of the step only, so a resumed run sees exactly
    the batches it would have seen."""
    out, orders = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(seed * 1000 + epoch).permutation(n)
        out.append(int(orders[epoch][k % n]))
    return out


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
        for i in range(len(seqs)):
            for j in range(i + 1, len(seqs)):
                if seqs[i] != seqs[j]:
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


def capped_steps(tcfg: TrainConfig, epochs: float, n_examples: int) -> TrainConfig:
    """`tcfg` with max_steps capped at `epochs` passes over n_examples (0 = no cap)."""
    if epochs <= 0 or n_examples <= 0:
        return tcfg
    per_step = tcfg.micro_batch * tcfg.grad_accum
    return replace(tcfg, max_steps=min(tcfg.max_steps,
                                       max(1, math.ceil(epochs * n_examples / per_step))))


def prepare_rm_data(cfg: Config, run_dir: Path, tok: Tokenizer, max_len: int) -> RMData:
    ranks = load_rankings(run_dir, cfg.pref)
    train, held = split_by_prompt(ranks, cfg.pref.heldout_fraction)

    def enc(rs: list[RankedExample]) -> list[list[list[int]]]:
        return [[encode_answer(tok, r.prompt, a, e, max_len)[0]
                 for a, e in zip(r.responses, r.ended, strict=True)] for r in rs]

    return RMData(train, held, enc(train), enc(held))


def run_rm(cfg: Config, run_dir: Path, force: bool = False, log=print) -> dict:
    out, done = run_dir / "rm", run_dir / "rm" / "done.json"
    if (finished := finished_stage(out, "rm", force, log)) is not None:
        return finished
    pref, tcfg = cfg.pref, cfg.rm
    pref.validate()
    d = single_process("rm")
    tok = Tokenizer.load(run_dir / "tokenizer")
    rm = reward_model_from_backbone(run_dir / "sft")
    check_seq_len("rm", tcfg.seq_len, rm.cfg.max_seq_len)
    rm.max_len = tcfg.seq_len
    data = prepare_rm_data(cfg, run_dir, tok, tcfg.seq_len)
    tcfg = capped_steps(tcfg, pref.rm_epochs, len(data.train))
    sampler = RankingSampler(data.train_ids, tok.pad, tcfg.micro_batch, tcfg.grad_accum,
                             tcfg.seed)
    n_answers = sum(len(r) for r in data.train_ids)
    avg_len = sum(len(s) for r in data.train_ids for s in r) / max(n_answers, 1)

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(rm, tcfg, out, "rm", run_dir, d)
    if trainer.resume():
        log(f"rm: resuming from step {trainer.step_idx}")
    else:
        log(f"rm: {len(data.train)} rankings ({n_answers} answers) to train on, "
            f"{len(data.heldout)} held out by prompt; loss {pref.rm_loss}, {tcfg.max_steps} "
            f"steps ({sampler.epoch(tcfg.max_steps):.1f} epochs)")
    rm = trainer.model
    stats: dict[str, float] = {}
    ctx = autocast(d.device, trainer.dtype)

    def loss_fn(m: nn.Module, b: RankBatch) -> Tensor:
        b = RankBatch(b.x.to(d.device), b.last.to(d.device), b.index.to(d.device),
                      b.mask.to(d.device), b.chosen.to(d.device), b.rejected.to(d.device),
                      b.weight, b.n_tokens)
        return rm_loss(m, b, pref, stats)

    def heldout_metrics() -> dict:
        with ctx:
            scores = score_rankings(rm, data.heldout_ids)
        return pair_metrics(*ranking_pairs(data.heldout_ids, scores))

    def periodic(step: int) -> dict:
        rec = {k: round(v, 4) for k, v in stats.items()}
        if data.heldout and tcfg.eval_every and step % tcfg.eval_every == 0:
            m = heldout_metrics()
            rec.update(val_acc=m["accuracy"], val_loss=m["loss"])
        return rec

    tokens_per_step = int(tcfg.micro_batch * tcfg.grad_accum * avg_len
                          * n_answers / max(len(data.train_ids), 1))
    trainer.fit(sampler.micro_batches, loss_fn, tokens_per_step, periodic, sampler.epoch)

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
            "offset_removed": round(offset, 6), "pref": asdict(pref)}
    atomic_write_json(out / META_FILE, meta)
    scores = {"heldout": {"chosen": [round(v, 5) for v in hc.tolist()],
                          "rejected": [round(v, 5) for v in hr.tolist()]},
              "heldout_rankings": [[round(v, 5) for v in r] for r in held_scores],
              "heldout_prompts": [r.prompt for r in data.heldout],
              "train_score_mean": 0.0,
              "train_score_std": round(float(np.std([s for r in train_scores for s in r])), 5),
              "reliability": held_m["bins"], "ece": held_m["ece"]}
    atomic_write_json(out / "scores.json", scores)
    figure = plot_scores(scores, held_m, run_dir / "report" / "rm_scores.png")
    result = {"heldout_accuracy": held_m["accuracy"], "n": held_m["n"], "ece": held_m["ece"],
              "loss": held_m["loss"], "train_accuracy": train_m["accuracy"],
              "train_pairs": train_m["n"], "heldout_rankings": len(data.heldout),
              "train_rankings": len(data.train), "objective": pref.rm_loss,
              "steps": trainer.step_idx, "minutes": round(trainer.elapsed / 60, 2)}
    update_summary(run_dir, "rm", result)
    atomic_write_json(done, result)
    acc = held_m["accuracy"]
    log(f"rm: held-out pairwise accuracy "
        f"{'n/a' if acc is None else f'{acc:.1%}'} over {held_m['n']} pairs "
        f"(train {train_m['accuracy']:.1%}), ECE {held_m['ece']}; figure {figure}")
    return result
