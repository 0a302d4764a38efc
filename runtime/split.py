"""Run a bundle cut into segments (``edgeft split``): unchanged layers run once per batch.

Segment i reads the tensors of segments below it and its own adapters. Its outputs
stay valid while the batch and the adapters of segments 0..i are unchanged, so a step
whose candidates differ only above layer ℓ runs the segments below ℓ once, and each
candidate runs only the segments from ℓ up.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgeft.errors import EdgeftError

from .bundle import Bundle, session_options


_shared_arena = False


def _share_one_arena(options: ort.SessionOptions) -> None:
    """All segment sessions draw from one CPU arena registered with ORT's environment, instead of
    one arena each (a segment's arena would otherwise grow to its own peak and stay there)."""
    global _shared_arena
    if not _shared_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena = True
    options.add_session_config_entry("session.use_env_allocators", "1")


class SegmentChain:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        spec = bundle.manifest.segments
        options = session_options(bundle.profile)
        _share_one_arena(options)
        providers = [p for p in bundle.profile.providers if p in ort.get_available_providers()]
        self.sessions = []
        for name in spec.files:
            try:
                self.sessions.append(ort.InferenceSession(str(bundle.folder / name), options, providers=providers))
            except Exception as err:  # ORT's own exception types for missing or corrupt files
                first = str(err).strip().splitlines()[0][:300]
                raise EdgeftError(f"{bundle.folder / name}: cannot load graph segment ({first})") from None
        self.inputs = [[i.name for i in s.get_inputs()] for s in self.sessions]
        # hidden-state outputs are statistics read from the whole graph: a segment returns one only
        # when a segment above reads it (a cut's boundary)
        read = {name for names in self.inputs for name in names}
        skip = set(bundle.manifest.hidden_states) - read
        self.outputs = [[o.name for o in s.get_outputs() if o.name not in skip] for s in self.sessions]
        self.available = {name for names in self.outputs for name in names}
        layout = bundle.layout
        self.slices = [[layout.slice_of(n) for n in group] for group in spec.adapters]
        # segment -> {id(feeds): (feeds dict, its adapter values, its outputs)}, for the batch (or the
        # row chunks of one batch) being evaluated; an entry is valid only while every lower one is
        self._cache: list[dict[int, tuple]] = [{} for _ in self.sessions]

    def forget(self) -> None:
        """Drop every cached segment output (the trainer moved to a new batch)."""
        for entries in self._cache:
            entries.clear()

    def provides(self, outputs: list[str]) -> bool:
        return all(o in self.available for o in outputs)

    def first_changed(self, candidates: list[np.ndarray]) -> int:
        """The lowest segment whose adapters differ between candidates (len: none differ)."""
        first = candidates[0]
        for index, slices in enumerate(self.slices):
            if any(not np.array_equal(c[s], first[s]) for c in candidates[1:] for s in slices):
                return index
        return len(self.slices)

    def run(self, feeds: dict[str, np.ndarray], adapter: np.ndarray, outputs: list[str], keep: bool = True) -> list[np.ndarray]:
        """``keep``: remember each segment's outputs for this batch (training candidates); held-out
        evaluation passes False, so it neither reads nor evicts the training batch's cache."""
        adapter = np.asarray(adapter, dtype=np.float32)
        values = {**feeds, **self.bundle.layout.unflatten(adapter)}
        valid = True
        for index, session in enumerate(self.sessions):
            own = np.concatenate([adapter[s] for s in self.slices[index]]) if self.slices[index] else adapter[:0]
            cached = self._cache[index].get(id(feeds))
            # A batch is known by identity: the trainer builds one feeds dict per step and never
            # mutates it; holding the dict itself keeps a new batch from reusing its id.
            valid = valid and keep and cached is not None and cached[0] is feeds and np.array_equal(cached[1], own)
            if valid:
                values.update(cached[2])
                continue
            result = dict(zip(self.outputs[index], session.run(self.outputs[index], {n: values[n] for n in self.inputs[index]})))
            values.update(result)
            if not keep:
                continue
            # the top segment's outputs (the logits) are not kept: its adapters change with every
            # candidate, so they would never be read again
            if index + 1 < len(self.sessions):
                self._cache[index][id(feeds)] = (feeds, own.copy(), result)
        return [values[o] for o in outputs]
