"""Run a split bundle: the graph below a layer once per batch, the part above once per candidate.

``edgeft split`` cut the graph at layer ℓ (see ``edgeft.export.split``). While the
candidates of a step differ only in the adapters of layers ≥ ℓ, the boundary tensors
(hidden states entering layer ℓ and the like) are the same for all of them: the lower
graph runs once for the batch and the upper graph once per candidate.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeft.errors import EdgeftError
from edgeft.manifest import SplitSpec

from .bundle import Bundle, session_options


class SplitRunner:
    def __init__(self, bundle: Bundle, spec: SplitSpec):
        self.bundle, self.spec = bundle, spec
        options = session_options(bundle.profile)
        providers = [p for p in bundle.profile.providers if p in ort.get_available_providers()]
        try:
            self.lower = ort.InferenceSession(str(bundle.folder / spec.lower), options, providers=providers)
            self.upper = ort.InferenceSession(str(bundle.folder / spec.upper), options, providers=providers)
        except Exception as err:
            first = str(err).strip().splitlines()[0][:300]
            raise EdgeftError(f"{bundle.folder}: cannot load split at layer {spec.at} ({first})") from None
        self.lower_inputs = [i.name for i in self.lower.get_inputs()]
        self.lower_outputs = [o.name for o in self.lower.get_outputs()]
        self.upper_inputs = [i.name for i in self.upper.get_inputs()]
        self.upper_outputs = [o.name for o in self.upper.get_outputs()]
        layout = bundle.layout
        varying = set(spec.varying)
        # Positions of the flat adapter vector the lower graph reads (must agree across candidates).
        self.fixed = [layout.slice_of(t.name) for t in layout.tensors if t.name not in varying]
        self._cache_key: tuple | None = None
        self._cache: dict[str, np.ndarray] = {}

    def covers(self, candidates: list[np.ndarray]) -> bool:
        """True if the candidates agree on every adapter value below the split."""
        first = candidates[0]
        return all(np.array_equal(c[s], first[s]) for c in candidates[1:] for s in self.fixed)

    def _lower(self, feeds: dict[str, np.ndarray], named: dict[str, np.ndarray], adapter: np.ndarray) -> dict:
        fixed = np.concatenate([adapter[s] for s in self.fixed]) if self.fixed else np.empty(0, np.float32)
        # A batch is known by identity: the trainer builds one feeds dict per step and never
        # mutates it. Holding the dict itself (not its id) keeps a new batch from matching.
        if self._cache_key is None or self._cache_key[0] is not feeds or self._cache_key[1] != fixed.tobytes():
            available = {**feeds, **named}
            values = self.lower.run(self.lower_outputs, {n: available[n] for n in self.lower_inputs})
            self._cache = {**feeds, **dict(zip(self.lower_outputs, values))}
            self._cache_key = (feeds, fixed.tobytes())
        return self._cache

    def run(self, feeds: dict[str, np.ndarray], adapter: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        named = self.bundle.layout.unflatten(np.asarray(adapter, dtype=np.float32))
        below = self._lower(feeds, named, adapter)
        wanted = [o for o in outputs if o in self.upper_outputs]
        values = dict(zip(wanted, self.upper.run(wanted, {n: below[n] if n in below else named[n] for n in self.upper_inputs})))
        return [values[o] if o in values else below[o] for o in outputs]
