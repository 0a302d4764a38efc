"""``edgeft deploy``: a trained adapter → what ships to users.

* default: the bundle's graph without its loss + one ONNX Runtime adapter file
  (``adapter.onnx_adapter``, loaded with ``onnxruntime.LoraAdapter`` and activated
  per run with ``RunOptions.add_active_adapter``): one small file per user or task;
* ``merge``: adapters folded into the weights, a plain inference graph;
* ``quantize="int8"``: ORT dynamic quantisation of the frozen weights on top;
* ``fmt="ort"``: the graph converted to ONNX Runtime's own format by its converter
  (``model.ort``, with ``required_operators.config`` for a reduced ORT Mobile build), what
  ORT Mobile on Android and iOS loads; the adapter file works with it unchanged.

Every output is checked against the unmerged fp32 bundle on sample texts: agreement
of predicted labels and the largest logit difference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from edgeft.adapters import bundle_layout, load_adapter
from edgeft.errors import EdgeftError
from edgeft.manifest import MODEL_NAME, TOKENIZER_NAME, Manifest

from .bundle import write_bundle
from .foreign_adapters import file_name, foreign_values
from .merge import inference_only, merge_adapters
from .onnx_files import load_model, remove, save_model
from .quantize import quantize_int8

ADAPTER_FILE = "adapter.onnx_adapter"
SAMPLE_TEXTS = [
    "An absolute delight from start to finish.", "I want those two hours of my life back.",
    "The plot meanders but the performances hold it together.", "A tedious, overlong mess.",
    "Funny, warm and surprisingly moving.", "Nothing here you have not seen before, and done better.",
    "The soundtrack is the only good thing about it.", "One of the best films of the year.",
]


ORT_MODEL, ORT_OPERATORS = "model.ort", "required_operators.config"
FORMATS = ("onnx", "ort")


def deploy(bundle: Path, adapter: Path, out: Path, merge: bool = False, quantize: str | None = None,
           texts: list[str] | None = None, fmt: str = "onnx", also_for: tuple[str, ...] = ()) -> dict:
    """``also_for``: besides edgeft's adapter file, one under the names ORT GenAI's builder ("genai") or
    Olive ("olive") give a LoRA-ready model's inputs (export/foreign_adapters.py)."""
    bundle, out = Path(bundle), Path(out)
    manifest = Manifest.load(bundle)
    # label logits (classification, prompt) or next-token logits (causal LM); a causal-LM bundle
    # exported before logits were a bundle output only has its per-document loss (a scorer)
    outputs = ["logits"] if "logits" in manifest.outputs else list(manifest.outputs)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")
    if quantize not in (None, "int8"):
        raise EdgeftError(f"unknown --quantize {quantize!r} (int8)")
    if fmt not in FORMATS:
        raise EdgeftError(f"unknown --format {fmt!r} ({', '.join(FORMATS)})")
    if merge and also_for:
        raise EdgeftError("--also-for writes an adapter file; a merged deploy has none (drop --merge)")
    layout = bundle_layout(bundle, manifest)
    vector = load_adapter(adapter, layout)
    values = {k: np.array(v) for k, v in layout.unflatten(vector).items()}
    foreign = {conv: foreign_values(manifest, values, conv) for conv in dict.fromkeys(also_for)}  # errors before any work
    model = load_model(bundle / MODEL_NAME)
    if merge:
        # prune first: a causal LM's top MLP outputs (training only) are adapted layers' outputs
        deployed = merge_adapters(inference_only(model, outputs, in_place=True), manifest, values, in_place=True)
    else:
        deployed = _with_default_adapters(inference_only(model, outputs, in_place=True),
                                          layout.unflatten(layout.initial(0)))
    del model
    info = {"task": manifest.task, "labels": manifest.labels, "template": manifest.template,
            "inputs": [i.name for i in deployed.graph.input if i.name not in values], "outputs": outputs,
            "merged": merge, "quantized": quantize, "adapter_file": None if merge else ADAPTER_FILE,
            "max_length": manifest.max_length, "pad_token_id": manifest.pad_token_id,
            "model_file": ORT_MODEL if fmt == "ort" else MODEL_NAME,
            "foreign_adapter_files": {conv: file_name(conv) for conv in foreign},
            "left_out_of_foreign_files": sorted({name for _, left in foreign.values() for name in left})}
    pending = [deployed]  # write() takes the graph and drops it once saved: the check then holds no copy
    del deployed

    def write(tmp: Path) -> dict:
        path = tmp / MODEL_NAME
        deployed = pending.pop()
        if quantize == "int8":
            fp32 = tmp / "model.fp32.onnx"
            save_model(deployed, fp32)
            quantize_int8(fp32, path, None if merge else manifest, architecture=manifest.architecture)
            remove(fp32)
        else:
            save_model(deployed, path)
        del deployed
        if fmt == "ort":
            _to_ort_format(path, tmp)
        if not merge:
            _save_ort_adapter(tmp / ADAPTER_FILE, values)
        for conv, (renamed, _) in foreign.items():
            _save_ort_adapter(tmp / file_name(conv), renamed)
        shutil.copy(bundle / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        (tmp / "deploy.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return check(bundle, vector, tmp, info, texts or SAMPLE_TEXTS)

    report = write_bundle(out, write)
    report["size_mb"] = round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 2)
    return report


def _to_ort_format(model: Path, folder: Path) -> None:
    """ONNX → ORT format with ONNX Runtime's converter (fixed optimisations: the file runs as converted
    on any ORT build), replacing the .onnx file."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    work = folder / "ort-conversion"
    convert_onnx_models_to_ort(model, output_dir=work, optimization_styles=[OptimizationStyle.Fixed])
    converted = work / (model.stem + ".ort")
    if not converted.is_file():
        raise EdgeftError(f"ONNX Runtime's converter wrote no {converted.name}")
    shutil.move(str(converted), str(folder / ORT_MODEL))
    operators = next(work.glob("*.config"), None)
    if operators is not None:
        shutil.move(str(operators), str(folder / ORT_OPERATORS))
    shutil.rmtree(work)
    model.unlink()


def _with_default_adapters(model: onnx.ModelProto, start: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Give every adapter input a default (an initializer of the same name): its start value, a zero
    update (LoRA B = 0, LoLDU z = 1, ...) and a zero head. A run then needs no adapter feeds: the
    adapter file, activated per run, overrides them; without one the graph is the base model."""
    from onnx import numpy_helper

    for name, value in start.items():
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
    return model


def _save_ort_adapter(path: Path, values: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                            for k, v in values.items()})
    adapter.export_adapter(str(path))


def run_deployed(folder: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a deployed folder the way an app would: plain session, plus the adapter file when there is one."""
    import onnxruntime as ort

    info = json.loads((Path(folder) / "deploy.json").read_text())
    session = ort.InferenceSession(str(Path(folder) / info.get("model_file", MODEL_NAME)), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    options = ort.RunOptions()
    if info["adapter_file"]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(Path(folder) / info["adapter_file"]))
        options.add_active_adapter(adapter)
    return session.run(info["outputs"], {k: v for k, v in feeds.items() if k in wanted}, options)


def check(bundle: Path, vector: np.ndarray, out: Path, info: dict, texts: list[str]) -> dict:
    """Deployed vs unmerged fp32 bundle on ``texts``."""
    from edgeft.runtime import Bundle

    reference = Bundle(bundle)
    labels = np.zeros(len(texts), dtype=np.int64)
    encoded = reference.encode(texts, labels if reference.task != "causal-lm" else None)
    feeds = reference.feeds(encoded, np.arange(len(encoded)))
    task = reference.task
    want = reference.run(feeds, vector, info["outputs"])
    del reference  # one session at a time: a billion-parameter pair would not fit a small machine
    got = run_deployed(out, feeds)
    report = {name: float(np.abs(g.astype(np.float64) - w).max()) for name, g, w in zip(info["outputs"], got, want)}
    if "logits" in info["outputs"]:
        same = got[0].argmax(-1) == want[0].argmax(-1)
        if task == "causal-lm":  # next-token predictions at the real (unpadded) positions
            report["next_token_agreement"] = float(same[feeds["attention_mask"].astype(bool)].mean())
        else:
            report["label_agreement"] = float(same.mean())
    return report
