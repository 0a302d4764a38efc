"""``edgeft fleet simulate``: the same ServerApp and ClientApp under Flower's simulation engine, then
the run folder: RUN/adapter (PEFT, as ``edgeft train`` writes), rounds.jsonl, state.json, curve.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgeft.errors import EdgeftError

from .apps import FleetSettings, _bundle, make_client_app, make_server_app
from .results import STATE_FILE, SUMMARY_FILE
from .protocol import FleetState


def check_settings(settings: FleetSettings, resume: bool, method: str = "seeds") -> None:
    """Everything that can be wrong with the request, before any client starts (one-line errors)."""
    from edgeft.data import load_dataset

    from .partition import partition
    from .start import needs_start

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
    if method == "fedavg" and needs_start(bundle, settings.init_adapter):
        raise EdgeftError("fleet --method fedavg: a classification head cannot start from zero on every device; "
                          "pass --init-adapter with a head (e.g. a seeds run's RUN/start)")


def simulate(settings: FleetSettings, resume: bool = False, tamper=None, method: str = "seeds", tamper_start=None) -> dict:
    """Run the fleet under Flower's simulation engine; ``method`` "fedavg" runs the usual baseline instead
    (the whole adapter each way, Flower's FedAvg; no --resume). A classification bundle without
    --init-adapter first fits the shared class-mean head with the devices (fleet/start.py)."""
    from flwr.simulation import run_simulation

    if method not in ("seeds", "fedavg"):
        raise EdgeftError(f"--method {method!r}: expected seeds or fedavg")
    if method == "fedavg" and resume:
        raise EdgeftError("--resume continues a seeds run; the fedavg baseline keeps no state")
    check_settings(settings, resume, method)
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if method == "fedavg":
        from .fedavg import make_fedavg_apps

        server, client = make_fedavg_apps(settings)
    else:
        server, client = make_server_app(settings), make_client_app(settings, tamper, tamper_start)
    run_simulation(server, client, num_supernodes=settings.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"log_to_driver": False}})
    if method == "seeds":
        state_path = run_dir / STATE_FILE
        if not state_path.is_file():
            raise EdgeftError("fleet: the simulation ended before its first round (see the log above)")
        state = FleetState.load(state_path)
        if state.round < settings.rounds or not (run_dir / SUMMARY_FILE).is_file():
            raise EdgeftError(f"fleet: the simulation stopped after round {state.round} of {settings.rounds} "
                              "(see the log above); --resume continues it")
    elif not (run_dir / SUMMARY_FILE).is_file():
        raise EdgeftError("fleet: the fedavg simulation did not finish (see the log above)")
    return json.loads((run_dir / SUMMARY_FILE).read_text())
