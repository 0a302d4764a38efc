"""``edgeft fleet simulate``: the same ServerApp and ClientApp under Flower's simulation engine, then
the run folder: RUN/adapter (PEFT, as ``edgeft train`` writes), rounds.jsonl, state.json, curve.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError

from .apps import ROUNDS_FILE, STATE_FILE, FleetSettings, _bundle, make_client_app, make_server_app, start_and_index
from .protocol import FleetState, replay


def check_settings(settings: FleetSettings, resume: bool) -> None:
    """Everything that can be wrong with the request, before any client starts (one-line errors)."""
    from edgeft.data import load_dataset

    from .partition import partition

    if settings.rounds < 1:
        raise EdgeftError("--rounds must be at least 1")
    if settings.clients < 1:
        raise EdgeftError("--clients must be at least 1")
    run_dir = Path(settings.run_dir)
    state = run_dir / STATE_FILE
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise EdgeftError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another -o")
    if resume and state.is_file():
        saved = FleetState.load(state)
        if saved.config != settings.config:
            raise EdgeftError(f"{state}: --resume with different fleet settings than the run began with")
    bundle = _bundle(settings.bundle)
    data = load_dataset(settings.data, bundle.labels, settings.text_field, settings.label_field)
    partition(settings.partition, settings.data, settings.clients, settings.config.seed,
              data.labels if bundle.task != "causal-lm" else None, settings.text_field)
    if settings.eval_data:
        load_dataset(settings.eval_data, bundle.labels, settings.text_field, settings.label_field)
    if bundle.task == "classification" and settings.init_adapter is None:
        raise EdgeftError("fleet: a classification head cannot start from zero on every device (there is no "
                          "shared probe yet): pass --init-adapter with a head, or use a prompt or causal-lm bundle")


def simulate(settings: FleetSettings, resume: bool = False, tamper=None) -> dict:
    from flwr.simulation import run_simulation

    from edgeft.adapters import save_adapter

    check_settings(settings, resume)
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(make_server_app(settings), make_client_app(settings, tamper), num_supernodes=settings.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"log_to_driver": False}})
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise EdgeftError("fleet: the simulation ended before its first round (see the log above)")
    state = FleetState.load(state_path)
    if state.round < settings.rounds:
        raise EdgeftError(f"fleet: the simulation stopped after round {state.round} of {settings.rounds} "
                          "(see the log above); --resume continues it")
    bundle = _bundle(settings.bundle)
    theta0, index = start_and_index(bundle, settings.config.seed, settings.init_adapter)
    theta = replay(theta0, state.history, settings.config, index)
    save_adapter(run_dir / "adapter", bundle.layout, theta, bundle.manifest.peft_base.get("source", ""),
                 "CAUSAL_LM" if bundle.task == "causal-lm" else None)
    rounds = [json.loads(line) for line in (run_dir / ROUNDS_FILE).read_text().splitlines()]
    plot = _plot(rounds, run_dir / "curve.png")
    final = next((r["eval"] for r in reversed(rounds) if "eval" in r), None)
    summary = {"rounds": state.round, "clients": settings.clients, "partition": settings.partition,
               "upload_bytes_per_client_round_max": max(r["upload_bytes_max"] for r in rounds),
               "download_bytes_per_client_round_max": max(r["download_bytes_max"] for r in rounds),
               "forward_passes": sum(r["client_forward_passes"] for r in rounds),
               "rejected_uploads": sum(len(r["rejected"]) for r in rounds), "eval": final,
               "adapter": str(run_dir / "adapter"), "plot": str(plot) if plot else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


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
