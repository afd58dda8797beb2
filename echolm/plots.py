"""Figures for the report, drawn from metrics.jsonl with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

from echolm.train.loop import read_metrics


def plot_pretrain(run_dir: Path) -> Path | None:
    """Training loss and held-out bits/byte against tokens seen: report/pretrain.png."""
    recs = read_metrics(run_dir / "metrics.jsonl", "base")
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    tokens = [r["tokens"] / 1e6 for r in recs]
    ax1.plot(tokens, [r["loss"] for r in recs], lw=1)
    ax1.set(xlabel="tokens seen (millions)", ylabel="training loss (nats/token)",
            title="Pretraining loss")
    val = [(r["tokens"] / 1e6, r["val_bpb"]) for r in recs if "val_bpb" in r]
    if val:
        ax2.plot(*zip(*val, strict=True), marker="o")
    ax2.set(xlabel="tokens seen (millions)", ylabel="bits per byte",
            title="Held-out bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "report" / "pretrain.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("pretrain.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
