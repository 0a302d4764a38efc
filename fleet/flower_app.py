"""The same apps for Flower's deployment engine (``flwr run`` against a SuperLink and SuperNodes).

The settings come from the run config (``[tool.flwr.app.config]`` of the app folder that
``write_app`` makes, or ``flwr run --run-config``) and, per device, from the SuperNode's node config:
``partition-id`` (its client id, 0..clients-1) and ``data`` (its own data file; without it the device
takes its ``--partition`` share of the run config's ``data``, as in simulation).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from .apps import OWN_DATA, FleetSettings, answer, client_start, client_train, run_server
from .protocol import FleetConfig

# run-config key → FleetConfig field (Flower config values are flat: str, int, float, bool)
CONFIG_KEYS = {"seed": "seed", "pool-size": "pool_size", "lr": "lr", "eps": "eps", "local-steps": "local_steps",
               "batch-size": "batch_size", "clip": "clip", "aggregate": "aggregate"}


def settings_from(run_config: dict, node_config: dict | None = None) -> FleetSettings:
    fleet = {field: run_config[key] for key, field in CONFIG_KEYS.items() if key in run_config}
    if fleet.get("lr") in (0, 0.0):
        fleet["lr"] = None  # 0 in a config: the default lr
    node = node_config or {}
    own = node.get("data")
    eval_data = run_config.get("eval-data") or None
    return FleetSettings(bundle=Path(node.get("bundle", run_config["bundle"])), data=Path(own or run_config["data"]),
                         run_dir=Path(run_config["run-dir"]), clients=int(run_config["clients"]),
                         rounds=int(run_config["rounds"]),
                         partition=OWN_DATA if own else str(run_config.get("partition", "iid")),
                         config=FleetConfig(**fleet), eval_data=Path(eval_data) if eval_data else None)


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server(grid, context) -> None:
    run_server(settings_from(dict(context.run_config)), grid)


@client_app.train()
def _train(msg: Message, context) -> Message:
    settings = settings_from(dict(context.run_config), dict(context.node_config))
    return answer(msg, context, lambda record: client_train(settings, record, context.state))


@client_app.query()
def _start(msg: Message, context) -> Message:
    settings = settings_from(dict(context.run_config), dict(context.node_config))
    return answer(msg, context, lambda record: client_start(settings, record, context.state))


APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgeft-fleet"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "edgeft"

[tool.flwr.app.components]
serverapp = "edgeft.fleet.flower_app:server_app"
clientapp = "edgeft.fleet.flower_app:client_app"

[tool.flwr.app.config]
{config}
"""


def write_app(folder: Path, run_config: dict) -> Path:
    """A Flower App folder for ``flwr run FOLDER CONNECTION``: the components above and ``run_config``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in run_config.items())
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(config=lines))
    return folder
