"""The Flower apps (Message API): a ServerApp that aggregates seeds and scalars, a ClientApp that trains.

Wire format (ConfigRecords only; no arrays ever cross; docs/FLEET.md):
  server → client, message type "train", record "fleet": round, node, selected (whether it trains this
      round), since and the history since then (hist_lr per round; hist_rounds / hist_indices /
      hist_values per pair)
  client → server, record "upload": Upload.to_record() (pairs, examples, known_round, loss,
      forward_passes, adapter digest) + client (its partition id) + skipped
A client keeps its adapter and applied round in its Context state; one that has none (new, restarted,
joining late) reports known_round 0 and gets the whole history next time. After the last round a closing
sync (selected false for all) brings every device up to date and collects their adapter digests.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import directions
from .protocol import FleetConfig, FleetState, Upload, aggregate, apply_round, check_upload, digest, replay, round_lr
from .results import ROUNDS_FILE, STATE_FILE, evaluate_adapter, finish, keep_best, write_adapter
from .start import needs_start
from .start_exchange import client_start, fit_start, head_tensors, held_head

OWN_DATA = "own"  # the partition of a deployed device: the whole data file it was started with


@dataclass
class FleetSettings:
    bundle: Path
    data: Path
    run_dir: Path
    clients: int
    rounds: int
    partition: str = "iid"
    config: FleetConfig = field(default_factory=FleetConfig)
    eval_data: Path | None = None
    eval_every: int = 1
    eval_limit: int | None = 200
    text_field: str = "text"
    label_field: str = "label"
    init_adapter: Path | None = None
    node_wait_s: float = 120.0  # how long the server waits for the clients to connect
    log: Callable[[str], None] = print


# --- shared by both sides ------------------------------------------------------


_BUNDLES: dict[str, object] = {}  # one ORT session per bundle per process (Ray reuses worker processes)


def _bundle(path: Path):
    from edgeft.runtime import Bundle

    key = str(Path(path).resolve())
    if key not in _BUNDLES:
        _BUNDLES[key] = Bundle(path)
    return _BUNDLES[key]


def start_and_index(bundle, seed: int, init_adapter: Path | None, head=None) -> tuple[np.ndarray, np.ndarray]:
    """The shared start (the same on every device: no local probe; ``head`` = (weight, bias), a classification
    fleet's class-mean head) and the searched values' positions."""
    from edgeft.adapters import load_adapter, searched_tensors

    theta = bundle.layout.initial(seed)
    if init_adapter is not None:
        theta = load_adapter(init_adapter, bundle.layout, base=theta)
    if head is not None:
        named = bundle.layout.unflatten(theta)
        for tensor, values in zip(head_tensors(bundle), head):
            named[tensor.name][...] = np.asarray(values, dtype=np.float32).reshape(tensor.shape)
    names = set(searched_tensors(bundle.layout, bundle.manifest))
    index = np.concatenate([np.arange(bundle.layout.slice_of(t.name).start, bundle.layout.slice_of(t.name).stop)
                            for t in bundle.layout.tensors if t.name in names])
    return theta, index


def selected(config: FleetConfig, round_: int, client: int, clients: int) -> bool:
    """Whether ``client`` trains in ``round_`` (decided from ids both sides know: resumable)."""
    if config.clients_per_round is None or config.clients_per_round >= clients:
        return True
    chosen = np.random.default_rng([config.seed, round_, 7]).choice(clients, config.clients_per_round, replace=False)
    return client in set(chosen.tolist())


def _history_record(history: list[dict], since: int) -> dict:
    rounds, indices, values = [], [], []
    for entry in history[since:]:
        for j, g in entry["pairs"]:
            rounds.append(int(entry["round"]))
            indices.append(int(j))
            values.append(float(g))
    lrs = [float(e["lr"] or 0.0) for e in history[since:]]  # 0: a round without pairs
    return {"since": since, "hist_rounds": rounds, "hist_indices": indices, "hist_values": values, "hist_lr": lrs}


def _history_from(record) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per round (from ``since`` to ``round - 1``), its lr and pairs."""
    since, until = int(record["since"]), int(record["round"])
    per_round: list[list[tuple[int, float]]] = [[] for _ in range(until - since)]
    for r, j, g in zip(record["hist_rounds"], record["hist_indices"], record["hist_values"]):
        per_round[int(r) - since].append((int(j), float(g)))
    return list(zip([float(v) for v in record["hist_lr"]], per_round))


def wire_bytes(record: dict) -> int:
    """Bytes of a ConfigRecord as Flower serialises it (protobuf)."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import config_record_to_proto

    return config_record_to_proto(ConfigRecord(record)).ByteSize()


# --- the client -------------------------------------------------------------------


def client_train(settings: FleetSettings, record, state) -> dict:
    """One train message on a device: catch up on the broadcast history, train if selected, upload.
    ``state`` is the Context's RecordDict (kept between rounds on that device)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from .client import local_round

    config, client = settings.config, int(record["client"])
    bundle = _bundle(settings.bundle)
    head = None
    if needs_start(bundle, settings.init_adapter):
        head = held_head(record, state)
        if head is None:  # restarted without its state: the server sends the head with the next message
            return Upload([], [], 1, known_round=0).to_record() | {"client": client, "skipped": True, "has_start": False}
    theta0, index = start_and_index(bundle, config.seed, settings.init_adapter, head)
    if "edgeft" in state:
        theta, known = state["edgeft-theta"]["theta"].numpy().copy(), int(state["edgeft"]["known_round"])
    else:
        theta, known = theta0, 0
    since, round_ = int(record["since"]), int(record["round"])
    if known < since:  # this device lost its state: ask for everything
        return Upload([], [], 1, known_round=0).to_record() | {"client": client, "skipped": True, "has_start": True}
    seeds = directions.pool(config.seed, config.pool_size)
    for offset, (lr, pairs) in enumerate(_history_from(record)):
        if since + offset >= known and pairs:
            apply_round(theta, pairs, lr, seeds, index)
    known = round_
    state["edgeft-theta"] = ArrayRecord({"theta": Array(theta)})
    state["edgeft"] = ConfigRecord({"known_round": known})
    if not bool(record["selected"]):  # not training this round (or the run's closing sync): caught up only
        return Upload([], [], 1, known_round=known, adapter=digest(theta)).to_record() | {"client": client, "skipped": True,
                                                                                          "has_start": True}
    _, encoded = client_data(settings, bundle, client)
    upload, _ = local_round(bundle, encoded, theta, config, round_, client, index)
    upload.known_round = known
    return upload.to_record() | {"client": client, "skipped": False, "has_start": True}


_ENCODED: dict[tuple, object] = {}  # a device's rows, read and tokenised once per process (not every round)


def client_data(settings: FleetSettings, bundle, client: int):
    """This device's rows: its own file (deployed), or its --partition share of the one file (simulated)."""
    key = (str(Path(settings.data).resolve()), settings.partition, settings.clients, settings.config.seed, client,
           str(Path(settings.bundle).resolve()))
    if key not in _ENCODED:
        _ENCODED[key] = _read_rows(settings, bundle, client)
    return _ENCODED[key]


def _read_rows(settings: FleetSettings, bundle, client: int):
    from edgeft.data import load_dataset

    from .partition import partition

    data = load_dataset(settings.data, bundle.labels, settings.text_field, settings.label_field)
    if settings.partition != OWN_DATA:
        labels = data.labels if bundle.task != "causal-lm" else None
        data = data.subset(partition(settings.partition, settings.data, settings.clients, settings.config.seed, labels,
                                     settings.text_field)[client])
    return data, bundle.encode(data.texts, data.labels)


def answer(msg, context, handle: Callable[[dict], dict]):
    """A ClientApp's reply to a "fleet" (train) or "start" (query) message: its record, with this device's
    partition id as ``client``, through ``handle``; the reply record is "upload" or "answer"."""
    from flwr.app import ConfigRecord, Message, RecordDict

    name = "fleet" if "fleet" in msg.content else "start"
    record = dict(msg.content[name])
    record["client"] = int(context.node_config.get("partition-id", record.get("client", 0)))
    reply = handle(record)
    return Message(content=RecordDict({"upload" if name == "fleet" else "answer": ConfigRecord(reply)}), reply_to=msg)


def make_client_app(settings: FleetSettings, tamper: Callable[[int, dict], dict] | None = None,
                    tamper_start: Callable[[int, str, dict], dict] | None = None):
    """The ClientApp. ``tamper`` and ``tamper_start`` (tests only) rewrite a client's upload in a round or in
    fitting the start: a poisoned device."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        def handle(record):
            reply = client_train(settings, record, context.state)
            return tamper(record["client"], reply) if tamper is not None else reply
        return answer(msg, context, handle)

    @app.query()
    def query(msg, context):
        def handle(record):
            reply = client_start(settings, record, context.state)
            return tamper_start(record["client"], record["step"], reply) if tamper_start is not None else reply
        return answer(msg, context, handle)

    return app


# --- the server -------------------------------------------------------------------


def make_server_app(settings: FleetSettings):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        run_server(settings, grid)

    return app


def _wait_for_nodes(grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < count:
        raise RuntimeError(f"fleet: {len(nodes)} of {count} clients connected within {wait_s:.0f} s")
    return nodes


def run_server(settings: FleetSettings, grid) -> FleetState:
    """Rounds until ``settings.rounds``, resuming from RUN/state.json when it is there."""
    run_dir, config = Path(settings.run_dir), settings.config
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    state = FleetState.load(state_path) if state_path.is_file() else FleetState(config)
    _drop_unsaved_rounds(run_dir / ROUNDS_FILE, state.round)
    nodes = _wait_for_nodes(grid, settings.clients, settings.node_wait_s)
    known: dict[int, int] = {}  # node → rounds it has applied (what it last said)
    client_of: dict[int, int] = {}  # node → the client id it reported
    bundle = _bundle(settings.bundle)
    head, start_fields, holding = None, None, {}  # holding: node → whether it holds the shared head
    if needs_start(bundle, settings.init_adapter):
        if state.start is None:
            state.start, holding = fit_start(settings, grid, nodes, bundle)
            state.save(state_path)
        head = (state.start["weight"], state.start["bias"])
        start_fields = {"start_weight": state.start["weight"], "start_bias": state.start["bias"]}
    theta0, index = start_and_index(bundle, config.seed, settings.init_adapter, head)
    if head is not None and not (run_dir / "start").exists():
        write_adapter(run_dir / "start", bundle, theta0)  # the shared start alone: central baselines take it as --init-adapter
    theta = replay(theta0, state.history, config, index)  # the shared adapter (kept up round by round)
    seeds = directions.pool(config.seed, config.pool_size)
    while state.round < settings.rounds:
        r = state.round
        shared = digest(theta)  # what every client must hold when it trains this round
        # a node whose client id is known yet is told whether it trains; an unknown one trains (its upload
        # is dropped if its client is not sampled this round)
        chosen = {node: node not in client_of or selected(config, r, client_of[node], settings.clients) for node in nodes}
        messages, down = _broadcast(state, nodes, known, r, chosen, start_fields, holding)
        uploads, rejected, up, seen, losses, passes = [], [], {}, set(), [], 0
        for reply in grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                rejected.append({"node": node, "reason": f"client error: {reply.error.reason}"})
                continue
            try:
                raw = dict(reply.content["upload"])
                up[node] = wire_bytes(raw)
                client = raw.get("client")
                if not isinstance(client, int) or not 0 <= client < settings.clients or client in seen:
                    raise ValueError(f"client id {client!r} unknown or repeated")
                seen.add(client)
                client_of[node] = client
                holding[node] = raw.get("has_start") is True
                known[node] = raw.get("known_round", 0) if isinstance(raw.get("known_round"), int) else 0
                selected_now = selected(config, r, client, settings.clients)
                if raw.get("skipped") is True or not selected_now:
                    continue
                upload = check_upload(raw, config)
                if upload.adapter != shared:
                    raise ValueError(f"trained from another adapter ({upload.adapter or 'none'} != {shared})")
                uploads.append((client, upload))
                losses.append(upload.loss)
                passes += upload.forward_passes
            except (ValueError, KeyError, TypeError) as err:
                rejected.append({"node": node, "reason": str(err)})
        for item in rejected:
            settings.log(f"round {r}: rejected an upload from node {item['node']}: {item['reason']}")
        uploads.sort(key=lambda cu: cu[0])  # a fixed order: the same sums on a resumed run
        pairs = aggregate([u for _, u in uploads], config)
        lr = round_lr(config, state.history, pairs, len(index))
        if pairs and lr is not None:
            apply_round(theta, pairs, lr, seeds, index)
        state.history.append({"round": r, "lr": lr, "pairs": [[j, g] for j, g in pairs] if lr is not None else []})
        line = {"round": r, "clients": len(nodes), "accepted": len(uploads), "rejected": rejected,
                "pairs": len(pairs), "upload_bytes_max": max(up.values(), default=0),
                "download_bytes_max": max(down.values(), default=0), "client_forward_passes": passes,
                "train_loss": float(np.nanmean(losses)) if losses else None}
        if settings.eval_data and ((r + 1) % settings.eval_every == 0 or r + 1 == settings.rounds):
            line["eval"] = evaluate_adapter(settings, bundle, theta)
        with open(run_dir / ROUNDS_FILE, "a") as handle:  # the log first: a kill before the save redoes the round
            handle.write(json.dumps(line, sort_keys=True) + "\n")
        state.save(state_path)
        settings.log(f"round {r}: {len(uploads)} uploads, {len(pairs)} pairs, up ≤ {line['upload_bytes_max']} B, "
                     f"down ≤ {line['download_bytes_max']} B" + (f", eval {line['eval']}" if "eval" in line else ""))
    agree = _closing_sync(settings, grid, state, nodes, known, digest(theta), start_fields, holding)
    start = {k: v for k, v in state.start.items() if k not in ("weight", "bias")} if state.start else None
    best = keep_best(settings, bundle, theta0, state, index) if settings.eval_data else None
    finish(settings, bundle, theta, lr=next((e["lr"] for e in state.history if e.get("lr")), None),
           clients_holding_the_adapter=agree, start=start, best=best)
    return state


def _drop_unsaved_rounds(log: Path, saved: int) -> None:
    """A run killed between logging a round and saving it redoes that round: drop its log line."""
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["round"] < saved]
        log.write_text("".join(line + "\n" for line in kept))


def _broadcast(state: FleetState, nodes: list[int], known: dict[int, int], r: int, chosen: dict[int, bool],
               start_fields: dict | None = None, holding: dict[int, bool] | None = None):
    """Round r's train messages: to each node the history it lacks, whether it trains, and the shared
    head if it does not hold it (a classification fleet's device that restarted or joined late)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    messages, down = [], {}
    for node in nodes:
        since = min(known.get(node, 0), r)
        # the node id makes every message's content distinct (Flower's deployment engine stores objects by
        # content hash)
        record = {"round": r, "node": int(node), **_history_record(state.history, since), "selected": chosen[node]}
        if start_fields and not (holding or {}).get(node):
            record.update(start_fields)
        down[node] = wire_bytes(record)
        messages.append(Message(content=RecordDict({"fleet": ConfigRecord(record)}), dst_node_id=node,
                                message_type="train", group_id=str(r)))
    return messages, down


def _closing_sync(settings: FleetSettings, grid, state: FleetState, nodes: list[int], known: dict[int, int],
                  shared: str, start_fields: dict | None = None, holding: dict[int, bool] | None = None) -> int:
    """After the last round every device applies it too and reports its adapter's digest: how many hold
    exactly the server's adapter (all of them, unless a device is faulty)."""
    messages, _ = _broadcast(state, nodes, known, state.round, {node: False for node in nodes}, start_fields, holding)
    agree = 0
    for reply in grid.send_and_receive(messages):
        held = None if reply.has_error() else dict(reply.content["upload"]).get("adapter")
        if held == shared:
            agree += 1
        else:
            settings.log(f"closing sync: node {reply.metadata.src_node_id} holds another adapter ({held} != {shared})")
    return agree
