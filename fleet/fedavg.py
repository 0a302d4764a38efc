"""The usual way, as the baseline: FedAvg of the whole LoRA adapter through Flower's own strategy.

The clients do exactly the fleet's local work (the same zeroth-order steps from the same adapter, seeded the
same way) and upload their moved adapter instead of seeds and scalars; Flower's ``FedAvg`` averages them
weighted by example counts. Same run folder as the fleet (adapter, rounds.jsonl, curve.png, summary.json),
so docs/FLEET.md can set score and bytes side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .apps import FleetSettings, _bundle, client_data, start_and_index
from .results import ROUNDS_FILE, evaluate_adapter, finish
from .client import local_round


def _array_bytes(record) -> int:
    from flwr.common.serde import array_record_to_proto

    return array_record_to_proto(record).ByteSize()


def make_fedavg_apps(settings: FleetSettings):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    server, client = ServerApp(), ClientApp()

    @client.train()
    def train(msg: Message, context) -> Message:
        bundle = _bundle(settings.bundle)
        _, index = start_and_index(bundle, settings.config.seed, settings.init_adapter)
        theta = msg.content["arrays"]["theta"].numpy().astype(np.float32)
        round_ = int(msg.content["config"]["server-round"]) - 1  # Flower counts rounds from 1
        who = int(context.node_config.get("partition-id", 0))
        _, encoded = client_data(settings, bundle, who)
        upload, local = local_round(bundle, encoded, theta, settings.config, round_, who, index)
        return Message(content=RecordDict({"arrays": ArrayRecord({"theta": Array(local)}),
                                           "metrics": MetricRecord({"num-examples": upload.examples,
                                                                    "forward-passes": upload.forward_passes})}),
                       reply_to=msg)

    @server.main()
    def main(grid, context) -> None:
        run_dir = Path(settings.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        bundle = _bundle(settings.bundle)
        theta0, _ = start_and_index(bundle, settings.config.seed, settings.init_adapter)
        start = ArrayRecord({"theta": Array(theta0)})
        size = _array_bytes(start)  # an adapter each way, per client and round

        def evaluate(server_round: int, arrays) -> MetricRecord | None:
            if server_round == 0:
                return None
            line = {"round": server_round - 1, "clients": settings.clients, "accepted": settings.clients,
                    "rejected": [], "upload_bytes_max": size, "download_bytes_max": size,
                    "client_forward_passes": settings.clients * settings.config.local_steps * 2}
            if settings.eval_data:
                line["eval"] = evaluate_adapter(settings, bundle, arrays["theta"].numpy().astype(np.float32))
            with open(run_dir / ROUNDS_FILE, "a") as handle:
                handle.write(json.dumps(line, sort_keys=True) + "\n")
            settings.log(f"fedavg round {server_round - 1}: up and down {size} B per client"
                         + (f", eval {line['eval']}" if "eval" in line else ""))
            return MetricRecord({k: v for k, v in line.get("eval", {}).items()})

        strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=settings.clients, min_available_nodes=settings.clients)
        result = strategy.start(grid=grid, initial_arrays=start, num_rounds=settings.rounds,
                                train_config=ConfigRecord({}), evaluate_fn=evaluate)
        theta = result.arrays["theta"].numpy().astype(np.float32)
        finish(settings, bundle, theta, method="fedavg")

    return server, client
