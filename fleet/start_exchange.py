"""The Flower side of a classification fleet's shared start (fleet/start.py holds the arithmetic and the
checks): the device's answers to the three start queries, and the server's exchange that fits the head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .protocol import digest
from .start import HEAD_ROLES

if TYPE_CHECKING:
    from .apps import FleetSettings

# apps.py imports this module; its helpers are imported inside the functions below (called after both loaded)


def head_tensors(bundle):
    by_role = {t.role: t for t in bundle.layout.tensors}
    return [by_role[role] for role in HEAD_ROLES]


def held_head(record: dict, state):
    """The shared head a device holds: from this message (a device that lacked it) or its own state."""
    from flwr.app import Array, ArrayRecord

    if "start_weight" in record:
        head = (np.asarray(record["start_weight"], dtype=np.float32), np.asarray(record["start_bias"], dtype=np.float32))
        state["edgeft-start"] = ArrayRecord({"weight": Array(head[0]), "bias": Array(head[1])})
        return head
    if "edgeft-start" in state:
        return state["edgeft-start"]["weight"].numpy(), state["edgeft-start"]["bias"].numpy()
    return None


def client_start(settings: FleetSettings, record: dict, state) -> dict:
    """A device's part in fitting the shared head (fleet/start.py): its class sums, its losses per
    temperature, then keeping the head."""
    from .apps import _bundle, client_data, start_and_index
    from .start import class_sums, temperature_losses

    bundle, client = _bundle(settings.bundle), int(record["client"])
    step = record["step"]
    if step == "hold":
        head = held_head({"start_weight": record["weight"], "start_bias": record["bias"]}, state)
        theta0, _ = start_and_index(bundle, settings.config.seed, settings.init_adapter, head)
        return {"client": client, "adapter": digest(theta0)}
    _, encoded = client_data(settings, bundle, client)
    features = _start_features(settings, bundle, client, encoded)
    if step == "sums":
        return {"client": client, **class_sums(features, encoded.labels, len(bundle.labels))}
    if step == "losses":
        means = np.asarray(record["means"], dtype=np.float64).reshape(len(bundle.labels), -1)
        return {"client": client, "examples": len(encoded),
                "losses": temperature_losses(features, encoded.labels, means, record["taus"])}
    raise ValueError(f"unknown start step {step!r}")


_FEATURES: dict[tuple, np.ndarray] = {}  # a device's pooled features at the start, computed once per process


def _start_features(settings: FleetSettings, bundle, client: int, encoded) -> np.ndarray:
    from edgeft.runtime.evaluate import pooled_features

    key = (str(Path(settings.bundle).resolve()), str(Path(settings.data).resolve()), settings.partition,
           settings.clients, settings.config.seed, client)
    if key not in _FEATURES:
        _FEATURES[key] = pooled_features(bundle, bundle.layout.initial(settings.config.seed), encoded, 32)
    return _FEATURES[key]



def fit_start(settings: FleetSettings, grid, nodes: list[int], bundle) -> tuple[dict, dict[int, bool]]:
    """Fit the shared class-mean head with the devices (fleet/start.py's three exchanges). Returns the
    start (head, temperature, what it cost on the wire) and which nodes hold it."""
    from .apps import start_and_index, wire_bytes
    from .start import TEMPERATURES, check_losses, check_sums, combine_means, head_from_means, pick_temperature

    weight_tensor = head_tensors(bundle)[0]
    labels, dim = weight_tensor.shape
    rejected, up, down = [], {}, {}

    def ask(step: str, fields: dict) -> list[tuple[int, dict]]:
        from flwr.app import ConfigRecord, Message, RecordDict

        messages = []
        for node in nodes:
            record = {"step": step, "node": int(node), **fields}
            down[node] = down.get(node, 0) + wire_bytes(record)
            messages.append(Message(content=RecordDict({"start": ConfigRecord(record)}), dst_node_id=node,
                                    message_type="query", group_id=f"start-{step}"))
        replies = []
        for reply in grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                rejected.append({"step": step, "node": node, "reason": f"client error: {reply.error.reason}"})
                continue
            raw = dict(reply.content["answer"])
            up[node] = max(up.get(node, 0), wire_bytes(raw))
            replies.append((node, raw))
        return sorted(replies, key=lambda nr: nr[0])  # a fixed order: the same sums on every run

    def accepted(step: str, replies, check) -> list:
        kept = []
        for node, raw in replies:
            try:
                kept.append(check(raw))
            except (ValueError, KeyError, TypeError) as err:
                rejected.append({"step": step, "node": node, "reason": str(err)})
                settings.log(f"start ({step}): rejected an upload from node {node}: {err}")
        if not kept:
            raise RuntimeError(f"fleet start: no device sent a usable {step} upload ({rejected[-1]['reason'] if rejected else 'no replies'})")
        return kept

    sums = accepted("sums", ask("sums", {}), lambda raw: check_sums(raw, labels, dim, settings.config.reject_above))
    means, counts = combine_means(sums, labels, dim, settings.log)
    losses = accepted("losses", ask("losses", {"means": means.ravel().tolist(), "taus": list(TEMPERATURES)}),
                      lambda raw: check_losses(raw, len(TEMPERATURES)))
    tau = pick_temperature(losses, TEMPERATURES)
    weight, bias = head_from_means(means, tau)
    head = {"weight": [float(v) for v in weight.ravel()], "bias": [float(v) for v in bias]}
    shared = digest(start_and_index(bundle, settings.config.seed, settings.init_adapter, (weight, bias))[0])
    holding = {}
    for node, raw in ask("hold", head):
        holding[node] = raw.get("adapter") == shared
        if not holding[node]:
            settings.log(f"start: node {node} holds another start ({raw.get('adapter')} != {shared})")
    settings.log(f"start: class-mean head from {int(counts.sum())} examples on {len(sums)} devices "
                 f"({int((counts > 0).sum())} of {labels} labels held), temperature {tau:g}")
    return {**head, "temperature": tau, "examples": int(counts.sum()), "labels_held": int((counts > 0).sum()),
            "devices": len(sums), "rejected": rejected, "upload_bytes_max": max(up.values(), default=0),
            "download_bytes_max": max(down.values(), default=0)}, holding
