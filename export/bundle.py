"""``edgeft export``: source model → bundle folder (model.onnx, tokenizer.json, edgeft.json)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeft.errors import EdgeftError
from edgeft.manifest import ADAPTER_INIT_NAME, MODEL_NAME, TOKENIZER_NAME, AdapterSpec, Manifest

from .adapters import DEFAULT_TARGETS, KINDS, LORA_INITS, inject_adapters
from .loading import Source, load_source
from .onnx_graph import export_onnx, verify_against_torch
from .tasks import CausalLM, Classification, Prompt, head_tensors, label_head_tensors, output_bias_tensor
from .top_mlp import OUTPUTS as TOP_OUTPUTS
from .top_blocks import (default_fit_layers, fitted_modules, top_block_layers, top_blocks_manifest, write_below_graph,
                         write_top_block_weights)
from .top_mlp import Capture, top_mlp_manifest, top_mlp_modules, write_top_mlp_weights
from .encoder_blocks import encoder_block_layers, encoder_blocks_manifest, write_encoder_block_weights


@dataclass
class ExportOptions:
    task: str = "classification"
    labels: list[str] = field(default_factory=list)
    template: str | None = None
    templates: list[str] = field(default_factory=list)  # several candidates: the one scoring best on template_data
    template_data: Path | None = None
    verbalizer: dict[str, str] = field(default_factory=dict)
    adapter: str = "lora"  # lora | loldu | tt | bone
    rank: int = 8
    alpha: float = 16.0
    init: str = "zeros"  # LoRA only: zeros | pissa
    tt_cores: int = 3
    targets: list[str] | None = None
    layers: str | None = None  # "top:N": adapters on the top N layers only, the graph split below them
    fit_layers: int | None = None  # top layers fitted from exact gradients (None: causal LM 80% of the layers, classification all; or N of top:N)
    max_length: int = 128
    pooling: str | None = None
    gguf_file: str | None = None
    opset: int = 18


def export_bundle(source: str, out: Path, options: ExportOptions, verify: bool = True, log=print) -> dict:
    """Export ``source`` into the bundle folder ``out``; returns the verification report."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")
    _check_options(options)
    if options.template_data is not None:  # bad data fails now, not after the export
        from edgeft.data import load_dataset

        load_dataset(options.template_data, options.labels)
    if source.endswith(".onnx"):
        if options.layers or options.fit_layers is not None:
            raise EdgeftError(f"--{'layers' if options.layers else 'fit-layers'}: ONNX sources are adapted on every "
                              "matching layer, without an exact fit (export from the model instead)")
        from .onnx_source import export_from_onnx

        return export_from_onnx(Path(source), out, options, verify=verify)
    src = load_source(source, options.task, options.gguf_file)
    targets = options.targets or DEFAULT_TARGETS.get(src.architecture)
    if not targets:
        raise EdgeftError(f"no default adapter targets for architecture {src.architecture!r}: pass --targets")
    layer_count = _layer_count(src.model)
    top = _top_layers(options.layers, layer_count)
    adapted = set(range(layer_count - top, layer_count)) if top else None
    # causal LM: LoRA on the MLPs of the top blocks too (Llama: the top 80% of them, or the adapted top N,
    # whose input is then the cut's boundary; top_blocks.py), or of the top layer only (other gated-MLP
    # architectures: top_mlp.py), fitted on the device from its exact gradient
    blocks = top_mlp = None
    # (a classifier's: all adapted layers, whose input the device computes once per example)
    default_fit = top or (layer_count if options.task == "classification" else default_fit_layers(layer_count))
    fit_count = options.fit_layers if options.fit_layers is not None else default_fit
    if not 0 <= fit_count <= (top or layer_count):
        raise EdgeftError(f"--fit-layers {fit_count}: expected 0 to {top or layer_count} (the adapted layers)")
    if options.task in ("causal-lm", "prompt") and fit_count:
        # a causal prompt is fitted the same way, on the prompt's loss at the answer position (prompt_fit.py)
        blocks = top_block_layers(src.model, src.architecture, options.adapter, fit_count)
        if options.task == "causal-lm" and not blocks:
            top_mlp = top_mlp_modules(src.model, src.architecture, options.adapter)
    fitted = fitted_modules(blocks) if blocks else list(top_mlp.values()) if top_mlp else []
    targets = list(targets) + [m for m in fitted if m not in targets]
    slots, tensors, stored = inject_adapters(src.model, targets, options.adapter, options.rank, options.alpha,
                                             options.init, options.tt_cores, adapted)
    manifest_extra: dict = {}
    candidates: list[str] = []
    tokenizer = src.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    if options.task == "classification":
        pooling = options.pooling or _default_pooling(src)
        hidden = src.model.config.hidden_size
        tensors += head_tensors(len(options.labels), hidden)
        wrapper = Classification(src.model, slots, [t.name for t in tensors], pooling)
        outputs = ["loss", "logits", "pooled"]
        manifest_extra["pooling"] = pooling
        # BERT family: the adapted layers' LoRA and the head, fitted on the device from their exact gradient
        # (encoder_blocks.py): by default all adapted layers, or the top --fit-layers of them
        encoder = encoder_block_layers(src.model, src.architecture, options.adapter, pooling,
                                       list(range(layer_count - fit_count, layer_count)) if fit_count else [])
        if encoder:
            manifest_extra["encoder_blocks"] = encoder_blocks_manifest(src.model, encoder)
    elif options.task == "prompt":
        mask_id = tokenizer.mask_token_id if src.auto_class == "AutoModelForMaskedLM" else None
        manifest_extra["template"] = _prompt_template(options.template, tokenizer, mask_id)
        candidates = [_prompt_template(t, tokenizer, mask_id) for t in options.templates]
        label_ids = [_label_token(tokenizer, options.verbalizer[name]) for name in options.labels]
        if len(set(label_ids)) != len(label_ids):
            raise EdgeftError("verbalizer: two labels map to the same first token")
        tensors += label_head_tensors(len(options.labels), src.model.config.hidden_size)
        wrapper = Prompt(src.model, slots, [t.name for t in tensors], label_ids, mask_id)
        outputs = ["loss", "logits", "pooled"]
        manifest_extra["verbalizer"] = dict(options.verbalizer)
        if blocks:
            manifest_extra["top_blocks"] = top_blocks_manifest(src.model, blocks, label_tokens=label_ids)
    else:
        tensors.append(output_bias_tensor(src.model.config.vocab_size))
        capture = Capture(src.model, top_mlp) if top_mlp else None
        wrapper = CausalLM(src.model, slots, [t.name for t in tensors], capture)
        outputs = ["loss", "token_count", "logits"]  # loss first: the runtime asks by name
        if top_mlp:
            outputs += list(TOP_OUTPUTS.values())
            manifest_extra["top_mlp"] = top_mlp_manifest(src.model, top_mlp)
        if blocks:
            manifest_extra["top_blocks"] = top_blocks_manifest(src.model, blocks)
    wrapper.eval()
    data_inputs = ["input_ids", "attention_mask"] + ([] if options.task == "causal-lm" else ["labels"])

    manifest = Manifest(
        task=options.task,
        source=src.name if not src.gguf_file else f"{src.name}::{src.gguf_file}",
        architecture=src.architecture,
        adapter=AdapterSpec(options.adapter, options.rank, options.alpha, list(targets), tensors, init=options.init,
                            tt_cores=options.tt_cores if options.adapter == "tt" else None,
                            init_file=ADAPTER_INIT_NAME if stored else None),
        inputs=data_inputs + [t.name for t in tensors],
        outputs=outputs,
        hidden_states=[f"hidden.{i}" for i in range(layer_count)],
        labels=list(options.labels),
        max_length=options.max_length,
        pad_token_id=int(pad_id),
        truncation_side="left" if options.task == "prompt" else "right",
        opset=options.opset,
        peft_base={"auto_class": src.auto_class, "source": src.name, "gguf_file": src.gguf_file},
        **manifest_extra,
    )
    manifest.validate()

    def write(tmp: Path) -> dict:
        log(f"exporting {src.architecture} ({options.task}) to ONNX ...")
        export_onnx(wrapper, manifest, tensors, tmp / MODEL_NAME, vocab_size=src.model.config.vocab_size)
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_NAME))
        if top_mlp:
            write_top_mlp_weights(src.model, top_mlp, tmp)
        if "encoder_blocks" in manifest_extra:
            write_encoder_block_weights(src.model, manifest.encoder_blocks.layers, tmp)
        if blocks:
            write_top_block_weights(src.model, blocks, tmp)
            if manifest.top_blocks.below:
                write_below_graph(tmp, manifest)
        if stored:
            from safetensors.numpy import save_file

            # safetensors writes an array's raw buffer: strided views must be made contiguous first
            save_file({k: np.ascontiguousarray(v) for k, v in stored.items()}, str(tmp / ADAPTER_INIT_NAME))
        manifest.save(tmp)
        report = verify_against_torch(wrapper, manifest, tmp / MODEL_NAME, src.model.config.vocab_size) if verify else {}
        if len(candidates) > 1:
            from .templates import choose_template

            choose_template(tmp, candidates, options.template_data, log=log)
        if top and top < layer_count:
            # the layers below the adapters are the same for every candidate: cut there, so the
            # device runs them once per batch (once per run on a whole few-shot set; docs/SPLIT.md)
            from .split import split_bundle

            split_bundle(tmp, [layer_count - top], log=log)
        return report

    return write_bundle(out, write)


def write_bundle(out: Path, write) -> dict:
    """Build the bundle in a temporary folder beside ``out`` and move it into place only when
    ``write(tmp)`` (export and check) succeeded: a failed export leaves nothing half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".edgeft-export-", dir=out.parent))
    try:
        report = write(tmp)
        _usual_modes(tmp)
        if out.exists():
            out.rmdir()
        shutil.move(str(tmp), str(out))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _usual_modes(folder: Path) -> None:
    """mkdtemp makes the folder owner-only (0700) and safetensors writes 0600 files: give the bundle the
    modes the user's umask gives any new file, so a bundle copied to a device or shared reads like one."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _check_options(o: ExportOptions) -> None:
    if o.task in ("classification", "prompt") and len(o.labels) < 2:
        raise EdgeftError(f"--task {o.task} needs --labels with at least two names")
    if o.templates and o.templates[0] != o.template:
        raise EdgeftError("ExportOptions.templates must start with ExportOptions.template")
    if (len(o.templates) > 1) != (o.template_data is not None):
        raise EdgeftError("--template-data chooses between several --template options: give both, or one template"
                          if o.task == "prompt" else "--template-data: --task prompt only")
    if o.task == "prompt":
        for template in o.templates or [o.template]:
            if not template or "{text}" not in template:
                raise EdgeftError("--task prompt needs --template containing {text}")
        missing = [name for name in o.labels if name not in o.verbalizer]
        if missing:
            raise EdgeftError(f"--verbalizer has no word for label(s) {', '.join(missing)}")
    if o.rank < 1 or o.alpha <= 0:
        raise EdgeftError("--rank must be >= 1 and --alpha > 0")
    if o.adapter not in KINDS:
        raise EdgeftError(f"--adapter {o.adapter}: unknown (expected one of {', '.join(KINDS)})")
    if o.init not in LORA_INITS or (o.init != "zeros" and o.adapter != "lora"):
        raise EdgeftError(f"--init {o.init}: LoRA only, one of {', '.join(LORA_INITS)}")
    if o.adapter == "tt" and o.tt_cores < 2:
        raise EdgeftError("--tt-cores must be at least 2")
    if o.max_length < 4:
        raise EdgeftError("--max-length must be at least 4")


def _top_layers(spec: str | None, layer_count: int) -> int | None:
    """``"top:N"`` → N (checked against the model); None or ``"all"`` → None (every layer)."""
    if spec in (None, "all"):
        return None
    kind, _, count = spec.partition(":")
    if kind != "top" or not count.isdigit() or not 1 <= int(count) <= layer_count:
        raise EdgeftError(f"--layers {spec!r}: expected top:N with 1 <= N <= {layer_count} (the model's layers), or all")
    return int(count)


def _layer_count(model) -> int:
    config = model.config
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))


def _default_pooling(src: Source) -> str:
    """The pooling the model was trained with; otherwise the architecture's stock head input."""
    if src.sentence_pooling == "mean":
        return "mean-normalized" if src.normalize else "mean"
    if src.sentence_pooling:
        return src.sentence_pooling
    if hasattr(src.model, "pooler") and src.model.pooler is not None:
        return "cls-pooler"
    if src.architecture in ("llama", "gpt2", "mistral", "qwen2"):
        return "last-token"
    return "cls"


def _prompt_template(template: str, tokenizer, mask_id: int | None) -> str:
    """A masked LM reads its answer at {mask}, spelled as the tokenizer's mask token in the bundle;
    a causal LM reads it after the last token, so its template must end where the answer begins."""
    if mask_id is not None:
        if "{mask}" not in template:
            raise EdgeftError("--template needs {mask} for a masked language model, e.g. \"{text} It was {mask}.\"")
        return template.replace("{mask}", tokenizer.mask_token)
    if "{mask}" in template:
        raise EdgeftError("--template: a causal language model has no {mask}; end the template where the label word goes")
    return template


def _label_token(tokenizer, word: str) -> int:
    """First token of the label word as it follows the template (a leading space for BPE)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EdgeftError(f"verbalizer word {word!r} tokenizes to nothing")
    return int(ids[0])


def sample_batch(manifest: Manifest, vocab_size: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids with ragged padding: the shape used to check an export."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):  # every row but the first is padded on the right
        length = int(rng.integers(max(2, seq // 2), seq + 1))
        mask[row, length:] = 0
        ids[row, length:] = manifest.pad_token_id
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "labels" in manifest.inputs:
        feeds["labels"] = rng.integers(0, len(manifest.labels), size=batch, dtype=np.int64)
    return feeds


def random_adapters(manifest: Manifest, seed: int) -> dict[str, np.ndarray]:
    """Non-zero adapter values, so an export check exercises every adapter path."""
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.shape) * 0.05).astype(np.float32) for t in manifest.adapter.tensors}


def to_torch(feeds: dict[str, np.ndarray]):
    return {k: torch.from_numpy(v) for k, v in feeds.items()}
