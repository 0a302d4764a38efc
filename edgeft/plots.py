"""Learning curve from a run's metrics.jsonl → curve.png."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def learning_curve_in_child(metrics_path: Path, out: Path, title: str = "") -> Path | None:
    """``learning_curve`` in a child process: importing matplotlib into the training process would add
    ~45 MB to its peak RSS (the ORT arena is still held when the plot is drawn), which on a device is
    memory the model could have used."""
    code = "import sys; from edgeft.plots import learning_curve; print(learning_curve(*sys.argv[1:4]) or '')"
    result = subprocess.run([sys.executable, "-c", code, str(metrics_path), str(out), title], capture_output=True, text=True)
    path = result.stdout.strip()
    return Path(path) if result.returncode == 0 and path else None


def learning_curve(metrics_path: Path, out: Path, title: str = "") -> Path | None:
    """Training loss (and its running mean) against steps, eval metric on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and not r.get("skipped")]
    evals = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        window = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - window + 1) : i + 1]) / len(y[max(0, i - window + 1) : i + 1]) for i in range(len(y))]
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (batch)")
        ax.plot(x, smooth, color="tab:blue", linewidth=1.6, label=f"train loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        key = "accuracy" if "accuracy" in evals[0]["eval"] else "perplexity"
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", color="tab:orange", label=f"eval {key}")
        ax2.set_ylabel(f"eval {key}")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title or "edgeft learning curve")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
