"""A fleet run's folder: RUN/adapter (the shared adapter, PEFT as ``edgeft train`` writes it), RUN/best-adapter
(the best round on the eval data), rounds.jsonl, curve.png and summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .protocol import FleetState, replay

if TYPE_CHECKING:
    from .apps import FleetSettings

STATE_FILE, ROUNDS_FILE, SUMMARY_FILE = "state.json", "rounds.jsonl", "summary.json"


def keep_best(settings: FleetSettings, bundle, theta0: np.ndarray, state: FleetState, index: np.ndarray) -> dict:
    """The shared adapter after the round that scored best on the eval data (or the start, scored here), as
    ``edgeft train`` keeps its best step: RUN/best-adapter, rebuilt by replaying the history up to that round.
    RUN/adapter stays the last round's, the one every device holds."""
    from edgeft.runtime.trainer import rank_key

    run_dir = Path(settings.run_dir)
    scored = [(None, evaluate_adapter(settings, bundle, theta0))]
    scored += [(r["round"], r["eval"]) for r in (json.loads(line) for line in (run_dir / ROUNDS_FILE).read_text().splitlines())
               if "eval" in r]
    round_, metrics = max(scored, key=lambda item: rank_key(bundle.task, item[1], held_out=True))  # first of ties
    adapter = theta0 if round_ is None else replay(theta0, state.history[:round_ + 1], settings.config, index)
    write_adapter(run_dir / "best-adapter", bundle, adapter)
    return {"round": round_, "eval": metrics, "start_eval": scored[0][1], "adapter": str(run_dir / "best-adapter")}


def finish(settings: FleetSettings, bundle, theta: np.ndarray, **method: object) -> dict:
    """The run folder's results: RUN/adapter (PEFT, as edgeft train writes), curve.png, summary.json (from
    rounds.jsonl, plus the ``method``'s own keys)."""
    run_dir = Path(settings.run_dir)
    write_adapter(run_dir / "adapter", bundle, theta)
    rounds = [json.loads(line) for line in (run_dir / ROUNDS_FILE).read_text().splitlines()]
    plot = _plot(rounds, run_dir / "curve.png")
    summary = {"rounds": len(rounds), "clients": settings.clients, "partition": settings.partition,
               "upload_bytes_per_client_round_max": max(r["upload_bytes_max"] for r in rounds),
               "download_bytes_per_client_round_max": max(r["download_bytes_max"] for r in rounds),
               "forward_passes": sum(r["client_forward_passes"] for r in rounds),
               "rejected_uploads": sum(len(r["rejected"]) for r in rounds),
               "eval": next((r["eval"] for r in reversed(rounds) if "eval" in r), None),
               "adapter": str(run_dir / "adapter"), "plot": str(plot) if plot else None, **method}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def write_adapter(folder: Path, bundle, theta: np.ndarray) -> None:
    from edgeft.adapters import save_adapter

    save_adapter(folder, bundle.layout, theta, bundle.manifest.peft_base.get("source", ""),
                 "CAUSAL_LM" if bundle.task == "causal-lm" else None)


def evaluate_adapter(settings: FleetSettings, bundle, theta: np.ndarray) -> dict:
    from edgeft.data import load_dataset
    from edgeft.runtime import evaluate

    data = load_dataset(settings.eval_data, bundle.labels, settings.text_field, settings.label_field)
    if settings.eval_limit and len(data) > settings.eval_limit:
        data = data.subset(np.arange(settings.eval_limit))
    metrics = evaluate(bundle, theta, bundle.encode(data.texts, data.labels), batch_size=8)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _plot(rounds: list[dict], path: Path) -> Path | None:
    evaluated = [r for r in rounds if "eval" in r]
    if not evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "perplexity" if "perplexity" in evaluated[0]["eval"] else "accuracy"
    sent = np.cumsum([r["upload_bytes_max"] * r["accepted"] + r["download_bytes_max"] * r["clients"] for r in rounds])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot([r["round"] + 1 for r in evaluated], [r["eval"][key] for r in evaluated], marker="o")
    left.set_xlabel("round")
    right.plot([sent[r["round"]] / 1024 for r in evaluated], [r["eval"][key] for r in evaluated], marker="o")
    right.set_xlabel("KB on the wire (all clients, up + down)")
    for ax in (left, right):
        ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
