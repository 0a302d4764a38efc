"""Open a bundle on the device: manifest, ONNX Runtime session, tokenizer, adapter layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgeft.adapters import bundle_layout
from edgeft.errors import EdgeftError
from edgeft.manifest import MODEL_NAME, TOKENIZER_NAME, Manifest

from .devices import DeviceProfile

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
    return options


class Bundle:
    """A bundle folder ready to run: ``bundle.run(feeds, adapter_vector)``."""

    def __init__(self, folder: str | Path, profile: DeviceProfile | None = None):
        self.folder = Path(folder)
        self.profile = profile or DeviceProfile()
        self.manifest = Manifest.load(self.folder)
        model_path = self.folder / MODEL_NAME
        if not model_path.is_file():
            raise EdgeftError(f"{self.folder}: bundle has no {MODEL_NAME}")
        providers = [p for p in self.profile.providers if p in ort.get_available_providers()]
        if not providers:
            raise EdgeftError(
                f"device '{self.profile.name}' needs {', '.join(self.profile.providers)}, "
                f"this onnxruntime has {', '.join(ort.get_available_providers())}"
            )
        try:
            self.session = ort.InferenceSession(str(model_path), session_options(self.profile), providers=providers)
        except Exception as err:  # ORT raises its own exception types for corrupt or foreign graphs
            first = str(err).strip().splitlines()[0][:300]
            raise EdgeftError(f"{model_path}: cannot load ONNX graph ({first})") from None
        self._check_graph()
        missing = [f for f in (self.manifest.segments.files if self.manifest.segments else []) if not (self.folder / f).is_file()]
        if missing:
            raise EdgeftError(f"{self.folder}: manifest lists graph segment {missing[0]}, which is missing (run edgeft split again)")
        tok_path = self.folder / TOKENIZER_NAME
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as err:
            raise EdgeftError(f"{tok_path}: cannot load tokenizer ({err})") from None
        self.layout = bundle_layout(self.folder, self.manifest)
        self.max_length = min(self.manifest.max_length, self.profile.max_length)
        self.tokenizer.no_padding()
        if self.task == "causal-lm":
            self.tokenizer.no_truncation()  # long documents are cut into windows instead (encode)
        else:
            self.tokenizer.enable_truncation(self.max_length, direction=self.manifest.truncation_side)

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def _check_graph(self) -> None:
        """The manifest must describe this graph: same inputs, shapes and outputs."""
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if sorted(graph_inputs) != sorted(self.manifest.inputs):
            extra = sorted(set(graph_inputs) ^ set(self.manifest.inputs))
            raise EdgeftError(f"{self.folder}: manifest does not match the graph (inputs differ: {', '.join(extra)})")
        if graph_outputs[: len(self.manifest.graph_outputs)] != self.manifest.graph_outputs:
            raise EdgeftError(f"{self.folder}: manifest does not match the graph (outputs {graph_outputs})")
        for t in self.manifest.adapter.tensors:
            shape = graph_inputs[t.name].shape
            if [d if isinstance(d, int) else -1 for d in shape] != list(t.shape):
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

    def run(self, feeds: dict[str, np.ndarray], adapter: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        named = self.layout.unflatten(np.asarray(adapter, dtype=np.float32))
        return self.session.run(outputs or ["loss"], {**feeds, **named})
