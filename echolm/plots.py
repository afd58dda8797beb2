"""Figures for the report, drawn from metrics.jsonl and the stages' done.json with matplotlib
(no display needed). Each function writes one PNG under DIR/report/ and returns its path, or
None when the stage has not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from echolm.metrics import read_metrics
from echolm.runfiles import read_json


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, run_dir: Path, name: str) -> Path:
    out = run_dir / "report" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(out)
    return out


def _done(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / stage / "done.json"
    return read_json(path, f"rerun the {stage} stage with --force", default=None)


def plot_pretrain(run_dir: Path) -> Path | None:
    """Training loss and held-out bits/byte against tokens seen."""
    recs = read_metrics(run_dir / "metrics.jsonl", "base")
    if not recs:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [(r["tokens"] / 1e6, r["loss"]) for r in recs if "loss" in r]
    if train:
        ax1.plot(*zip(*train, strict=True), lw=1)
    ax1.set(xlabel="tokens seen (millions)", ylabel="training loss (nats/token)",
            title="Pretraining loss")
    val = [(r["tokens"] / 1e6, r["val_bpb"]) for r in recs if "val_bpb" in r]
    if val:
        ax2.plot(*zip(*val, strict=True), marker="o")
    ax2.set(xlabel="tokens seen (millions)", ylabel="bits per byte",
            title="Held-out bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, run_dir, "pretrain.png")


def plot_sft(run_dir: Path) -> Path | None:
    """SFT loss curves and held-out accuracy per task, base vs SFT."""
    recs, done = read_metrics(run_dir / "metrics.jsonl", "sft"), _done(run_dir, "sft")
    if not recs or not done:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    if train:
        ax1.plot(*zip(*train, strict=True), lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if val:
        ax1.plot(*zip(*val, strict=True), marker="o", label="held-out")
    ax1.set(xlabel="step", ylabel="loss on assistant tokens", title="SFT loss")
    ax1.legend()
    tasks = done["tasks"]
    names = list(tasks)
    xs = range(len(names))
    ax2.bar([x - 0.2 for x in xs], [tasks[n]["base"] for n in names], 0.4, label="base")
    ax2.bar([x + 0.2 for x in xs], [tasks[n]["sft"] for n in names], 0.4, label="SFT")
    ax2.set_xticks(list(xs), names, rotation=20)
    ax2.set(ylabel="held-out accuracy (greedy)", ylim=(0, 1), title="Before and after SFT")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, run_dir, "sft.png")


def plot_rl(run_dir: Path) -> Path | None:
    """GRPO training curves: reward, zero-variance groups, response length, entropy."""
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl", "rl") if "reward_mean" in r]
    if not recs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    steps = [r["step"] for r in recs]
    for ax, key, title in zip(axes, ("reward_mean", "zero_variance_frac", "response_len",
                                     "entropy"),
                              ("mean reward", "groups with equal rewards", "response tokens",
                               "policy entropy"), strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in recs], lw=1)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    return _save(fig, run_dir, "rl.png")


def plot_pass_at_k(run_dir: Path) -> Path | None:
    """pass@k against k before and after RL, per task (Yue et al., 2025)."""
    done = _done(run_dir, "rl")
    if not done:
        return None
    plt = _plt()
    tasks = done["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items(), strict=True):
        before = f"before RL ({done.get('init', 'sft').upper()})"
        for key, label in (("pass@k_before", before), ("pass@k_after", "after RL")):
            ks = sorted(t[key], key=int)
            ax.plot([int(k) for k in ks], [t[key][k] for k in ks], marker="o", label=label)
        ax.set(xscale="log", xlabel="k (samples)", ylabel="pass@k", ylim=(0, 1),
               title=f"{name} (n={t['n']})")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, run_dir, "pass_at_k.png")


def plot_rlhf(run_dir: Path) -> Path | None:
    """Proxy (reward model) and gold (annotator) reward against KL to SFT: guarded run and
    the unguarded one (Gao et al., 2022)."""
    done = _done(run_dir, "rlhf")
    if not done:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("guarded", done["history"])]
    if done.get("unguarded_history"):
        runs.append(("unguarded, beta=0", done["unguarded_history"]))
    for ax, (label, hist) in zip((ax1, ax2), runs, strict=False):
        kl = [h["kl"] for h in hist]
        ax.plot(kl, [h["proxy"] for h in hist], marker="o", label="proxy (reward model)")
        ax.set(xlabel="KL to SFT (nats per answer)", ylabel="proxy reward",
               title=f"RLHF, {label}")
        twin = ax.twinx()
        twin.plot(kl, [h["gold"] for h in hist], marker="s", color="tab:red",
                  label="gold (annotator)")
        twin.set_ylabel("gold reward", color="tab:red")
        ax.grid(alpha=0.3)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    if len(runs) == 1:
        ax2.axis("off")
    return _save(fig, run_dir, "rlhf_overoptimisation.png")


def plot_all(run_dir: Path) -> list[Path]:
    figures = [f(run_dir) for f in (plot_pretrain, plot_sft, plot_rl, plot_pass_at_k,
                                   plot_rlhf)]
    return [f for f in figures if f is not None]
