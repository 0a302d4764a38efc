"""Open a bundle on the device: manifest, ONNX Runtime session, tokenizer, adapter layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgeft.adapters import bundle_layout
from edgeft.errors import EdgeftError
from edgeft.manifest import MODEL_NAME, TOKENIZER_NAME, Manifest, bundle_file

from .devices import DeviceProfile
from .memory import return_large_frees_to_the_os

return_large_frees_to_the_os()  # before any session is created (runtime/memory.py: a 200 MB spread otherwise)

_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32}


@dataclass
class Encoded:
    """Token ids of a data set, tokenised once; batches are padded to their longest row."""

    ids: list[np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def _declared(shape) -> list[int]:
    """An ORT input's shape as the manifest writes it (a named, dynamic dimension is -1)."""
    return [d if isinstance(d, int) else -1 for d in shape]


def session_options(profile: DeviceProfile) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = profile.intra_op_threads
    options.inter_op_num_threads = 1
    # research.md: memory-pattern planning off cut peak RSS ~25% at equal speed with
    # dynamic shapes; the CPU arena stays on (turning it off made memory worse).
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = True
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not profile.prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class Bundle:
    """A bundle folder ready to run: ``bundle.run(feeds, adapter_vector)``.

    A bundle cut into segments (``edgeft split``, ``edgeft export --layers top:N``) runs through
    its segments only (``runtime/split.py``): together they hold every weight once, so loading the
    whole graph beside them would hold the weights twice. The whole graph is opened only if an
    output the segments do not return is asked for (hidden states between cuts), or with
    ``use_segments=False`` (to compare the two).
    """

    def __init__(self, folder: str | Path, profile: DeviceProfile | None = None, use_segments: bool = True,
                 open_graph: bool = True):
        """``open_graph=False``: do not open (nor check) the whole graph yet; it opens on first use.
        Training passes it, then opens the graph its run needs: only the graph below the top blocks
        (``below_session``) when the run is a causal LM's exact fit alone (``TopBlocks.standalone``),
        so that the fit does not hold the weights twice; else the whole graph, before any work."""
        self.folder = Path(folder)
        self.profile = profile or DeviceProfile()
        self.manifest = Manifest.load(self.folder)
        self.model_path = self.folder / MODEL_NAME
        if not self.model_path.is_file():
            raise EdgeftError(f"{self.folder}: bundle has no {MODEL_NAME}")
        self.providers = [p for p in self.profile.providers if p in ort.get_available_providers()]
        if not self.providers:
            raise EdgeftError(
                f"device '{self.profile.name}' needs {', '.join(self.profile.providers)}, "
                f"this onnxruntime has {', '.join(ort.get_available_providers())}"
            )
        self.layout = bundle_layout(self.folder, self.manifest)
        self._session = None
        self.chain = None
        segments = self.manifest.segments if use_segments else None
        if segments:
            missing = [f for f in segments.files if not (self.folder / f).is_file()]
            if missing:
                raise EdgeftError(f"{self.folder}: manifest lists graph segment {missing[0]}, which is missing (run edgeft split again)")
            from .split import SegmentChain

            self.chain = SegmentChain(self)
        self._below = None
        if self.chain is not None:
            self._check_graph()
        elif open_graph:
            self.session  # opened and checked against the manifest
        tok_path = self.folder / TOKENIZER_NAME
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as err:
            raise EdgeftError(f"{tok_path}: cannot load tokenizer ({err})") from None
        self.max_length = min(self.manifest.max_length, self.profile.max_length)
        self.tokenizer.no_padding()
        if self.task == "causal-lm":
            self.tokenizer.no_truncation()  # long documents are cut into windows instead (encode)
        else:
            self.tokenizer.enable_truncation(self.max_length, direction=self.manifest.truncation_side)

    @property
    def session(self) -> ort.InferenceSession:
        """The whole graph's session, opened (and checked against the manifest) on first use."""
        if self._session is None:
            self._session = self._open(self.model_path)
            if self.chain is None:  # a split bundle was checked against its segments when it opened
                self._check_graph()
        return self._session

    @property
    def graph_open(self) -> bool:
        return self._session is not None or self.chain is not None

    def _open(self, path: Path) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(path), session_options(self.profile), providers=self.providers)
        except Exception as err:  # ORT raises its own exception types for corrupt or foreign graphs
            first = str(err).strip().splitlines()[0][:300]
            raise EdgeftError(f"{path}: cannot load ONNX graph ({first})") from None

    @property
    def below_session(self) -> ort.InferenceSession | None:
        """The graph under a causal LM's top blocks (``TopBlocks.below``), opened and checked on first
        use; None where the bundle has none."""
        top = self.manifest.top_blocks
        if top is None or top.below is None:
            return None
        if self._below is None:
            path = bundle_file(self.folder, top.below)
            if not path.is_file():
                raise EdgeftError(f"{self.folder}: manifest lists {top.below}, which is missing")
            session = self._open(path)
            shapes = {t.name: t.shape for t in self.manifest.adapter.tensors}
            inputs = {i.name: i.shape for i in session.get_inputs()}
            start = top.below_input()
            wrong = [n for n, shape in inputs.items() if n not in (start, "attention_mask")
                     and _declared(shape) != list(shapes.get(n, ()))]
            if wrong or start not in inputs or top.input not in [o.name for o in session.get_outputs()]:
                raise EdgeftError(f"{path}: does not match the manifest (" + (f"input {wrong[0]}" if wrong else
                                  f"needs input {start} and output {top.input}") + ")")
            self._below = session
        return self._below

    def close_graph(self) -> None:
        """Release the whole graph's session (and ORT's arena with it) until something runs it again: an exact
        fit that has read what it needs from it holds its own weights meanwhile."""
        self._session = None
        _return_freed_memory()

    def close_below(self) -> None:
        """Release the graph under the top blocks (the fit is done; a search that follows runs the whole graph)."""
        self._below = None

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def _check_graph(self) -> None:
        """The manifest must describe this graph (or its segments together): same inputs, shapes and outputs."""
        if self.chain is not None:
            produced = {o.name for s in self.chain.sessions for o in s.get_outputs()}
            graph_inputs = {i.name: i for s in self.chain.sessions for i in s.get_inputs() if i.name not in produced}
            main = [o for o in self.manifest.graph_outputs if o not in produced]
            if main:
                raise EdgeftError(f"{self.folder}: manifest does not match the graph segments (no output {main[0]})")
        else:
            graph_inputs = {i.name: i for i in self._session.get_inputs()}
            graph_outputs = [o.name for o in self._session.get_outputs()]
            if graph_outputs[: len(self.manifest.graph_outputs)] != self.manifest.graph_outputs:
                raise EdgeftError(f"{self.folder}: manifest does not match the graph (outputs {graph_outputs})")
        if sorted(graph_inputs) != sorted(self.manifest.inputs):
            extra = sorted(set(graph_inputs) ^ set(self.manifest.inputs))
            raise EdgeftError(f"{self.folder}: manifest does not match the graph (inputs differ: {', '.join(extra)})")
        for t in self.manifest.adapter.tensors:
            shape = graph_inputs[t.name].shape
            if _declared(shape) != list(t.shape):
                raise EdgeftError(f"{self.folder}: manifest shape {t.shape} of {t.name} does not match the graph's {shape}")

    # --- text → ids ---------------------------------------------------------

    def prepare(self, text: str) -> str:
        template = self.manifest.template
        return template.replace("{text}", text) if template else text

    def encode(self, texts: list[str], labels: np.ndarray | None = None) -> Encoded:
        """Token ids per text. A causal LM's documents are cut into consecutive windows of
        ``max_length`` tokens (every token is scored once) instead of being truncated."""
        encodings = self.tokenizer.encode_batch([self.prepare(t) for t in texts])
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        if self.task == "causal-lm":
            n = self.max_length
            ids = [doc[i : i + n] for doc in ids for i in range(0, len(doc), n) if len(doc[i : i + n]) >= 2]
        return Encoded(ids, labels)

    def feeds(self, encoded: Encoded, index: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for the rows ``index``, right-padded to the longest of them."""
        rows = [encoded.ids[i] for i in index]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "labels" in self.manifest.inputs:
            if encoded.labels is None:
                raise EdgeftError(f"the {self.task} bundle needs labelled data")
            feeds["labels"] = np.asarray(encoded.labels[index], dtype=np.int64)
        return feeds

    # --- running ------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray], adapter: np.ndarray, outputs: list[str] | None = None,
            keep: bool = False) -> list[np.ndarray]:
        """The graph's ``outputs`` for these inputs and adapter values. ``keep`` (a split bundle
        only): cache the segments' outputs for this batch, for the next candidate on it."""
        outputs = outputs or ["loss"]
        if self.chain is not None and self.chain.provides(outputs):
            return self.chain.run(feeds, adapter, outputs, keep=keep)
        named = self.layout.unflatten(np.asarray(adapter, dtype=np.float32))
        return self.session.run(outputs, {**feeds, **named})

    def output_shape(self, name: str) -> list | None:
        """The declared shape of a graph output (None when the graph has no such output)."""
        sessions = self.chain.sessions if self.chain is not None else [self.session]
        for session in sessions:
            for o in session.get_outputs():
                if o.name == name:
                    return list(o.shape)
        return None


def _return_freed_memory() -> None:
    """Hand the pages freed by a released session back to the system: glibc keeps freed heap memory for later
    allocations, and numpy's large arrays (mmap'd) would not reuse it, so the fit's weights would sit beside it.
    No-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass

