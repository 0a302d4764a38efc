"""The bundle manifest (``edgeft.json``): what a bundle's graph expects and returns.

A bundle is a folder: ``model.onnx`` + ``tokenizer.json`` + ``edgeft.json``. The
manifest is the contract between the exporter (workstation) and the runtime (device):
task, labels, prompt, every adapter tensor (name, shape, init, PEFT key) and the
graph's input/output names. Saved as sorted JSON; unknown keys are ignored on load
so that older runtimes read newer bundles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError

MANIFEST_NAME = "edgeft.json"
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
ADAPTER_INIT_NAME = "adapter_init.safetensors"  # start values computed at export (init "stored")
FORMAT_VERSION = 1
TASKS = ("classification", "prompt", "causal-lm")
ADAPTER_KINDS = ("lora", "loldu", "tt", "bone")


@dataclass
class AdapterTensor:
    """One trainable tensor fed to the graph as an input."""

    name: str  # graph input name
    shape: list[int]
    # "zeros" | "ones" | "kaiming-uniform" | "tt-normal" | "probe" (fitted on device)
    # | "stored" (computed at export, in the bundle's adapter_init.safetensors)
    init: str
    peft_key: str | None = None  # key in the saved adapter_model.safetensors; None for the head
    module: str | None = None  # the torch module it adapts (PEFT target)
    # lora_A | lora_B | loldu_z | loldu_scale | tt_core | bone_block | head_weight | head_bias | output_weight | output_bias
    role: str = "lora_A"
    weight_shape: list[int] | None = None  # [out, in] of the adapted weight (sizes the population optimizers' steps)
    # RMS of ΔW per unit-variance change of this tensor at the start, where it depends on frozen
    # factors the device does not see (LoLDU); the runtime computes the others from the start values
    update_gain: float | None = None


@dataclass
class AdapterSpec:
    kind: str = "lora"  # lora | loldu | tt | bone
    rank: int = 8  # LoRA/TT rank, LoLDU kept rank, Bone block size
    alpha: float = 16.0
    targets: list[str] = field(default_factory=list)
    tensors: list[AdapterTensor] = field(default_factory=list)
    init: str = "zeros"  # how LoRA starts: "zeros" (B = 0) | "pissa"
    tt_cores: int | None = None
    init_file: str | None = None  # ADAPTER_INIT_NAME when a tensor's init is "stored"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class Segments:
    """The bundle graph cut at layers ``cuts`` (``edgeft split``) into ``files``; segment i
    reads the adapter tensors ``adapters[i]``. The runtime re-runs only the segments from
    the lowest one whose adapters changed."""

    cuts: list[int]
    files: list[str]  # inside the bundle, bottom to top
    adapters: list[list[str]]


@dataclass
class TopMLP:
    """A causal LM's top-layer MLP, out = down(silu(gate(n)) ⊙ up(n)), added to the residual stream that
    the final RMSNorm and the LM head read. Its LoRA has an exact loss gradient computable from forward
    outputs (``outputs``: the final residual, n, and the gate and up outputs at every position) and
    the frozen weights in ``weights`` (a safetensors file in the bundle: ``lm_head`` [vocab, hidden],
    ``final_norm`` [hidden], ``down`` [hidden, intermediate])."""

    modules: dict[str, str]  # "gate" | "up" | "down" -> adapted module name (LoRA tensors <module>.lora_A/B)
    outputs: dict[str, str]  # "residual" | "mlp_input" | "gate" | "up" -> graph output name
    weights: str
    norm_eps: float
    activation: str = "silu"


BLOCK_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TopBlocks:
    """A Llama-family causal LM's top decoder blocks (``layers``, contiguous up to the last), whose
    LoRA on the ``fitted`` roles (the MLPs' gate, up, down) the device fits from an exact gradient:
    it recomputes these blocks' forward in numpy from the hidden state entering the lowest of them
    (the graph output ``input``) and differentiates it by hand (``runtime/top_blocks.py``).
    ``weights`` (a safetensors file in the bundle) holds their frozen weights: ``lm_head``
    [vocab, hidden], ``final_norm`` [hidden] and per layer ℓ ``ℓ.input_norm``, ``ℓ.post_norm`` and
    ``ℓ.<role>`` [out, in] for every role (the bases under any LoRA), and the token embedding table
    under the name ``embedding`` (``lm_head`` where the two are tied); an int8/int4 bundle's matrices may be
    stored as 8- or 4-bit codes with block scales (``edgeft/block_weights.py``). ``below`` (an ONNX file in the
    bundle) is the graph of the layers under the blocks, from the embeddings (its input ``hidden.0``)
    to ``input``: with it the fit never opens the whole graph, so the device holds each weight once
    (None where the blocks start at layer 0: the embeddings are their input). An int8/int4 bundle's is cut from
    its compressed graph, so the layers under the blocks run with their quantised weights: at the token ids
    where its table is untied (``embedding`` None, since session 22), at ``hidden.0`` where the table is the
    LM head (``lm_head``, since session 23: the head in ``weights`` is the graph's table, held once). Bundles exported before
    session 18 have neither; their fit reads ``input`` from the whole graph. Supersedes ``TopMLP`` (one
    block's MLP) for Llama exports; RoPE without scaling, no attention or MLP biases. A prompt bundle's
    (``label_tokens``: the label words' token ids, the LM-head rows its answer logits read) is fitted on the
    prompt loss at the answer position, with the label-word output adapter (``runtime/prompt_fit.py``)."""

    layers: list[int]
    modules: list[dict[str, str]]  # per layer: role (BLOCK_ROLES) -> module name (LoRA tensors <module>.lora_A/B)
    fitted: list[str]  # roles whose LoRA the fit trains; other adapted roles only enter its forward
    input: str
    weights: str
    norm_eps: float
    rope_theta: float
    heads: int
    kv_heads: int
    head_dim: int
    embedding: str | None = None  # the embedding table's name in ``weights`` (None: an untied int8/int4, or before session 18)
    below: str | None = None  # the graph under the blocks
    label_tokens: list[int] | None = None  # prompt bundles (since session 21): the label words' first tokens

    def standalone(self) -> bool:
        """Whether the fit runs without the whole graph: ``below`` (if any) runs the layers under the blocks
        (from the embeddings numpy looks up, or from the token ids), numpy the blocks and the LM head."""
        return self.below is not None or (self.embedding is not None and self.input == "hidden.0")

    def below_input(self) -> str:
        """What ``below`` starts from: the embeddings numpy computes, or (no ``embedding``) the token ids."""
        return "hidden.0" if self.embedding is not None else "input_ids"


ENCODER_ROLES = ("q", "k", "v", "o", "up", "down")
ENCODER_POOLING = ("mean", "mean-normalized", "cls")


@dataclass
class EncoderBlocks:
    """A BERT-family classifier's encoder layers (``layers``, contiguous up to the last), whose LoRA and
    linear head the device fits from their exact gradient: it recomputes these layers' forward in numpy
    (post-norm: LayerNorm after each residual; biases; erf GELU), the pooling and the head from the
    hidden state entering the lowest of them (the graph output ``input``, computed once per example: the
    layers below are frozen meanwhile) and differentiates it all by hand (``runtime/encoder_blocks.py``).
    ``weights`` (a safetensors file in the bundle) holds per layer ℓ ``ℓ.<role>`` [out, in] and
    ``ℓ.<role>.bias`` for every role (the bases under any LoRA) and ``ℓ.attention_norm``,
    ``ℓ.output_norm`` (with ``.bias``). The fitted tensors are the bundle's own LoRA on these layers and
    its head, which the search may still change afterwards (so they are not ``exact_fit_tensors``)."""

    layers: list[int]
    modules: list[dict[str, str]]  # per layer: role (ENCODER_ROLES) -> module name
    input: str
    weights: str
    norm_eps: float
    heads: int
    head_dim: int
    activation: str = "gelu"
    # the prefix in ``weights`` of the embedding tables (``.word`` [vocab, hidden], ``.position`` [positions, hidden],
    # ``.type`` [hidden]: type 0) and their LayerNorm (``.norm``, ``.norm.bias``), where ``input`` is ``hidden.0``
    embedding: str | None = None


def bundle_file(folder: Path, name: str) -> Path:
    """``folder / name`` for a file the manifest names; a symlink that leads outside the bundle is refused."""
    path = Path(folder) / name
    if path.is_symlink() and not path.resolve().is_relative_to(Path(folder).resolve()):
        raise EdgeftError(f"{path}: links outside the bundle folder; refusing to read it")
    return path


def _file_name(what: str, name) -> None:
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise EdgeftError(f"manifest: {what} {name!r} must be a file name inside the bundle")


@dataclass
class Manifest:
    task: str
    source: str
    architecture: str
    adapter: AdapterSpec
    inputs: list[str]
    outputs: list[str]
    labels: list[str] = field(default_factory=list)
    template: str | None = None
    verbalizer: dict[str, str] = field(default_factory=dict)
    pooling: str | None = None  # classification: "mean" | "mean-normalized" | "cls-pooler" | "last-token"
    max_length: int = 128
    pad_token_id: int = 0
    truncation_side: str = "right"
    opset: int = 18
    edgeft_version: str = "0.1.0"
    format_version: int = FORMAT_VERSION
    peft_base: dict = field(default_factory=dict)  # how to rebuild the torch model for PEFT
    segments: Segments | None = None
    # graph outputs after ``outputs``: the hidden state entering each layer [batch, seq, hidden],
    # read once before training to scale population optimizers' projections per layer
    hidden_states: list[str] = field(default_factory=list)
    # causal LM: the top layer's MLP, whose LoRA the device fits from exact gradients (runtime/top_fit.py);
    # None for bundles without it (other architectures and adapter types, older exports)
    top_mlp: TopMLP | None = None
    # causal LM (Llama family): the top blocks whose MLP LoRA the device fits from exact gradients
    top_blocks: TopBlocks | None = None
    # classification (BERT family): the encoder layers whose LoRA and head the device fits exactly
    encoder_blocks: EncoderBlocks | None = None

    def exact_fit_tensors(self) -> set[str]:
        """Adapter tensors fitted from their exact gradient before the search (which leaves them alone)."""
        names = set()
        if self.top_mlp is not None:
            names |= {f"{m}.{ab}" for m in self.top_mlp.modules.values() for ab in ("lora_A", "lora_B")}
        if self.top_blocks is not None:
            names |= {f"{layer[r]}.{ab}" for layer in self.top_blocks.modules for r in self.top_blocks.fitted
                      for ab in ("lora_A", "lora_B")}
        return names

    @property
    def graph_outputs(self) -> list[str]:
        return self.outputs + self.hidden_states

    def validate(self) -> None:
        if self.task not in TASKS:
            raise EdgeftError(f"manifest: unknown task {self.task!r} (expected one of {', '.join(TASKS)})")
        if self.task in ("classification", "prompt") and len(self.labels) < 2:
            raise EdgeftError(f"manifest: a {self.task} bundle needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise EdgeftError("manifest: labels are not unique")
        if self.adapter.kind not in ADAPTER_KINDS:
            raise EdgeftError(f"manifest: adapter type {self.adapter.kind!r} is unknown to this edgeft "
                              f"({', '.join(ADAPTER_KINDS)}); a newer edgeft exported it?")
        if any(t.init == "stored" for t in self.adapter.tensors) and not self.adapter.init_file:
            raise EdgeftError("manifest: adapter tensors with stored start values but no init_file")
        names = [t.name for t in self.adapter.tensors]
        if len(set(names)) != len(names):
            raise EdgeftError("manifest: adapter tensor names are not unique")
        for t in self.adapter.tensors:
            if t.name not in self.inputs:
                raise EdgeftError(f"manifest: adapter tensor {t.name!r} is not among the graph inputs")
            if not t.shape or any(int(d) <= 0 for d in t.shape):
                raise EdgeftError(f"manifest: adapter tensor {t.name!r} has an invalid shape {t.shape}")
        if self.top_mlp is not None:
            top = self.top_mlp
            if not isinstance(top.modules, dict) or not isinstance(top.outputs, dict) or not isinstance(top.weights, str):
                raise EdgeftError("manifest: malformed top_mlp")
            if set(top.modules) != {"gate", "up", "down"} or set(top.outputs) != {"residual", "mlp_input", "gate", "up"}:
                raise EdgeftError("manifest: top_mlp must name the gate, up and down modules and its four outputs")
            missing = [f"{m}.{ab}" for m in top.modules.values() for ab in ("lora_A", "lora_B") if f"{m}.{ab}" not in names]
            if missing or top.activation != "silu" or not all(o in self.outputs for o in top.outputs.values()):
                raise EdgeftError(f"manifest: top_mlp does not match the graph ({missing[0] if missing else 'outputs'})")
            _file_name("top_mlp weights", top.weights)
        if self.top_blocks is not None:
            self._validate_top_blocks(names)
        if self.encoder_blocks is not None:
            self._validate_encoder_blocks(names)
        if self.segments and (sorted(n for group in self.segments.adapters for n in group) != sorted(names)
                              or len(self.segments.files) != len(self.segments.adapters)):
            raise EdgeftError("manifest: segments do not cover the adapter tensors exactly once")

    def _validate_top_blocks(self, names: list[str]) -> None:
        top = self.top_blocks
        if not all(isinstance(v, list) for v in (top.layers, top.modules, top.fitted)) or not isinstance(top.input, str):
            raise EdgeftError("manifest: malformed top_blocks (layers, modules and fitted are lists)")
        try:
            layers, modules = [int(i) for i in top.layers], [dict(m) for m in top.modules]
            sizes = [int(top.heads), int(top.kv_heads), int(top.head_dim)]
            numbers = [float(top.norm_eps), float(top.rope_theta)]
            fitted = list(top.fitted)
        except (TypeError, ValueError):
            raise EdgeftError("manifest: malformed top_blocks") from None
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))) or len(modules) != len(layers):
            raise EdgeftError("manifest: top_blocks needs contiguous layers, one module map each")
        if any(set(m) != set(BLOCK_ROLES) for m in modules) or not fitted or not set(fitted) <= set(BLOCK_ROLES):
            raise EdgeftError(f"manifest: top_blocks must map the roles {', '.join(BLOCK_ROLES)} and fit some of them")
        if min(sizes) <= 0 or sizes[0] % sizes[1] or min(numbers) <= 0:
            raise EdgeftError("manifest: top_blocks has impossible sizes (heads, kv_heads, head_dim, eps, rope_theta)")
        missing = sorted(n for n in self.exact_fit_tensors() if n not in names)
        if missing or top.input not in self.hidden_states:
            raise EdgeftError(f"manifest: top_blocks does not match the graph ({missing[0] if missing else top.input})")
        _file_name("top_blocks weights", top.weights)
        if top.embedding is not None and not isinstance(top.embedding, str):
            raise EdgeftError("manifest: top_blocks.embedding must name a tensor of its weights file")
        if top.below is not None:
            _file_name("top_blocks below graph", top.below)
        if (self.task == "prompt") != (top.label_tokens is not None):
            raise EdgeftError("manifest: top_blocks.label_tokens belongs to prompt bundles, and every prompt bundle's top_blocks has it")
        if top.label_tokens is not None and (
                not isinstance(top.label_tokens, list) or len(top.label_tokens) != len(self.labels)
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in top.label_tokens)):
            raise EdgeftError("manifest: top_blocks.label_tokens must be one token id per label")

    def _validate_encoder_blocks(self, names: list[str]) -> None:
        top = self.encoder_blocks
        if not isinstance(top.layers, list) or not isinstance(top.modules, list) or not isinstance(top.input, str):
            raise EdgeftError("manifest: malformed encoder_blocks (layers and modules are lists)")
        try:
            layers, modules = [int(i) for i in top.layers], [dict(m) for m in top.modules]
            sizes, eps = [int(top.heads), int(top.head_dim)], float(top.norm_eps)
        except (TypeError, ValueError):
            raise EdgeftError("manifest: malformed encoder_blocks") from None
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))) or len(modules) != len(layers):
            raise EdgeftError("manifest: encoder_blocks needs contiguous layers, one module map each")
        if any(set(m) != set(ENCODER_ROLES) for m in modules):
            raise EdgeftError(f"manifest: encoder_blocks must map the roles {', '.join(ENCODER_ROLES)}")
        if min(sizes) <= 0 or eps <= 0 or top.activation != "gelu" or self.task != "classification":
            raise EdgeftError("manifest: encoder_blocks has impossible sizes, activation or task")
        if self.pooling not in ENCODER_POOLING or not {"head.weight", "head.bias"} <= set(names):
            raise EdgeftError(f"manifest: encoder_blocks needs a linear head and pooling {' or '.join(ENCODER_POOLING)}")
        if top.input not in self.hidden_states:
            raise EdgeftError(f"manifest: encoder_blocks does not match the graph ({top.input})")
        _file_name("encoder_blocks weights", top.weights)
        if top.embedding is not None and (not isinstance(top.embedding, str) or top.input != "hidden.0"):
            raise EdgeftError("manifest: encoder_blocks.embedding names tables only for a fit from hidden.0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, folder: Path) -> None:
        self.validate()
        (Path(folder) / MANIFEST_NAME).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, raw: dict) -> "Manifest":
        try:
            adapter_raw = dict(raw["adapter"])
            tensors = [_known(AdapterTensor, t) for t in adapter_raw.pop("tensors", [])]
            adapter = _known(AdapterSpec, adapter_raw)
            adapter.tensors = tensors
            body = {k: v for k, v in raw.items() if k not in ("adapter", "segments", "top_mlp", "top_blocks", "encoder_blocks")}
            segments = _known(Segments, raw["segments"]) if raw.get("segments") else None
            top_mlp = _known(TopMLP, raw["top_mlp"]) if raw.get("top_mlp") else None
            top_blocks = _known(TopBlocks, raw["top_blocks"]) if raw.get("top_blocks") else None
            encoder_blocks = _known(EncoderBlocks, raw["encoder_blocks"]) if raw.get("encoder_blocks") else None
            manifest = _known(cls, {**body, "adapter": adapter, "segments": segments, "top_mlp": top_mlp,
                                    "top_blocks": top_blocks, "encoder_blocks": encoder_blocks})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise EdgeftError(f"manifest: malformed ({err})") from None
        if manifest.format_version > FORMAT_VERSION:
            raise EdgeftError(
                f"manifest: format version {manifest.format_version} is newer than this edgeft reads ({FORMAT_VERSION})"
            )
        manifest.validate()
        return manifest

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise EdgeftError(f"{folder}: not a bundle (no {MANIFEST_NAME})")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EdgeftError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise EdgeftError(f"{path}: not a manifest object")
        return cls.from_dict(raw)


def _known(cls, raw: dict):
    """Build a dataclass from a dict, ignoring keys this version does not know."""
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in raw.items() if k in names})
