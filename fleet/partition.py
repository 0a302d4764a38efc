"""Which rows of a data file each client holds: ``iid``, ``dirichlet:ALPHA`` (label skew) or
``by-field:NAME`` (one client per value of a user column, e.g. a play's speaking character)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.data import read_rows
from edgeft.errors import EdgeftError


def partition(spec: str, path: Path, clients: int, seed: int, labels: np.ndarray | None = None,
              text_field: str = "text") -> list[np.ndarray]:
    """Row indices per client (each sorted, none empty); a one-line error for a spec that cannot be met."""
    if clients < 1:
        raise EdgeftError("--clients must be at least 1")
    kind, _, arg = spec.partition(":")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        n = len(read_rows(path, text_field, None))
        parts = np.array_split(rng.permutation(n), clients)
    elif kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise EdgeftError(f"--partition {spec!r}: expected dirichlet:ALPHA, e.g. dirichlet:0.3") from None
        if not alpha > 0:
            raise EdgeftError(f"--partition {spec!r}: ALPHA must be more than 0")
        if labels is None:
            raise EdgeftError(f"--partition {spec!r} skews labels: the data has none (use iid or by-field:NAME)")
        owners = [[] for _ in range(clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, part in enumerate(np.split(rows, cuts)):
                owners[client] += part.tolist()
        parts = [np.array(p, dtype=np.int64) for p in owners]
    elif kind == "by-field":
        if not arg:
            raise EdgeftError(f"--partition {spec!r}: expected by-field:NAME")
        values = [str(v) for _, v in read_rows(path, text_field, arg)]
        by_value: dict[str, list[int]] = {}
        for row, value in enumerate(values):
            by_value.setdefault(value, []).append(row)
        if len(by_value) < clients:
            raise EdgeftError(f"--partition {spec!r}: {len(by_value)} distinct values, fewer than --clients {clients}")
        # the users with the most rows, one client each (ties by name: the same on every machine)
        ranked = sorted(by_value, key=lambda v: (-len(by_value[v]), v))[:clients]
        parts = [np.array(by_value[v], dtype=np.int64) for v in ranked]
    else:
        raise EdgeftError(f"--partition {spec!r}: expected iid, dirichlet:ALPHA or by-field:NAME")
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise EdgeftError(f"--partition {spec!r}: client {empty[0]} gets no rows ({clients} clients); use fewer clients")
    return parts
