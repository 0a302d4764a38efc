"""An existing ONNX file (e.g. ``optimum-cli export onnx`` output) → bundle, by graph surgery.

Two passes, ONNX in, ONNX out:

* ``add_lora_inputs``: for every MatMul whose node name carries a target module
  (``/encoder/layer.0/attention/self/query/MatMul``) and whose weight is an
  initializer, add graph inputs A [r, in] and B [out, r] and the branch
  y = x·W + scale·(x·Aᵀ)·Bᵀ.
* ``add_classification_loss``: pool ``last_hidden_state`` over real tokens, apply a
  head whose weight and bias are graph inputs, and return per-example
  cross-entropy, logits and the pooled features.

Only classification is supported from ONNX sources; names follow the exporter's node
scopes, which is how optimum and torch's TorchScript exporter name nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterTensor

from .onnx_files import clone, fits_in_memory, save_model


def _module_of(node_name: str) -> str:
    """'/encoder/layer.0/attention/self/query/MatMul' → 'encoder.layer.0.attention.self.query'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def check_lora_targets(model: onnx.ModelProto, targets: list[str]) -> list[onnx.NodeProto]:
    """The MatMul nodes the LoRA pass would adapt; an error saying why when there are none."""
    weights = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        module = _module_of(node.name)
        if not any(module == t or module.endswith("." + t) for t in targets):
            continue
        if node.input[1] not in weights or len(weights[node.input[1]].dims) != 2:
            continue
        found.append(node)
    if not found:
        raise EdgeftError(
            f"no MatMul node named after targets {','.join(targets)} with a 2-D weight "
            "(node names must keep the module scope, as optimum and the TorchScript exporter write them)"
        )
    return found


def add_lora_inputs(model: onnx.ModelProto, targets: list[str], rank: int, alpha: float) -> tuple[onnx.ModelProto, list[AdapterTensor]]:
    model = clone(model)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    scale_name = "edgeft.lora_scale"
    graph.initializer.append(numpy_helper.from_array(np.array(alpha / rank, dtype=np.float32), scale_name))
    specs: list[AdapterTensor] = []
    new_nodes: list[onnx.NodeProto] = []
    # match by name and work on copies: protobuf hands out a new wrapper object on every access
    targeted = {n.name for n in check_lora_targets(model, targets)}
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        new_nodes.append(node)
        if node.name not in targeted:
            continue
        module = _module_of(node.name)
        fan_in, fan_out = (int(d) for d in weights[node.input[1]].dims)
        a, b = f"{module}.lora_A", f"{module}.lora_B"
        specs.append(AdapterTensor(a, [rank, fan_in], "kaiming-uniform", f"base_model.model.{module}.lora_A.weight", module, "lora_A", [fan_out, fan_in]))
        specs.append(AdapterTensor(b, [fan_out, rank], "zeros", f"base_model.model.{module}.lora_B.weight", module, "lora_B", [fan_out, fan_in]))
        graph.input.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [rank, fan_in]))
        graph.input.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [fan_out, rank]))
        out = node.output[0]
        base = out + "/edgeft_base"
        node.output[0] = base
        p = f"/edgeft/{module}"
        new_nodes += [
            helper.make_node("Transpose", [a], [p + "/At"], name=p + "/TransposeA"),
            helper.make_node("Transpose", [b], [p + "/Bt"], name=p + "/TransposeB"),
            helper.make_node("MatMul", [node.input[0], p + "/At"], [p + "/xA"], name=p + "/MatMulA"),
            helper.make_node("MatMul", [p + "/xA", p + "/Bt"], [p + "/xAB"], name=p + "/MatMulB"),
            helper.make_node("Mul", [p + "/xAB", scale_name], [p + "/delta"], name=p + "/Scale"),
            helper.make_node("Add", [base, p + "/delta"], [out], name=p + "/Add"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model, specs


def add_classification_loss(model: onnx.ModelProto, num_labels: int, pooling: str, hidden_output: str = "last_hidden_state") -> tuple[onnx.ModelProto, list[AdapterTensor]]:
    model = clone(model)
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if hidden_output not in outputs:
        raise EdgeftError(f"the ONNX graph has no output {hidden_output!r} (outputs: {', '.join(outputs)})")
    hidden_size = outputs[hidden_output].type.tensor_type.shape.dim[-1].dim_value
    if not hidden_size:
        raise EdgeftError(f"output {hidden_output!r} has no static hidden size")
    _drop_token_type_ids(graph)
    c = lambda name, value: graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))  # noqa: E731
    c("edgeft.axis1", np.array([1], dtype=np.int64))
    c("edgeft.axis_last", np.array([-1], dtype=np.int64))
    c("edgeft.tiny", np.array(1e-9, dtype=np.float32))
    c("edgeft.norm_eps", np.array(1e-12, dtype=np.float32))
    n = helper.make_node
    nodes = [
        n("Cast", ["attention_mask"], ["/edgeft/maskf"], to=TensorProto.FLOAT, name="/edgeft/CastMask"),
        n("Unsqueeze", ["/edgeft/maskf", "edgeft.axis_last"], ["/edgeft/mask3"], name="/edgeft/UnsqueezeMask"),
    ]
    if pooling in ("mean", "mean-normalized"):
        nodes += [
            n("Mul", [hidden_output, "/edgeft/mask3"], ["/edgeft/masked"], name="/edgeft/MaskHidden"),
            n("ReduceSum", ["/edgeft/masked", "edgeft.axis1"], ["/edgeft/sum"], keepdims=0, name="/edgeft/SumTokens"),
            n("ReduceSum", ["/edgeft/mask3", "edgeft.axis1"], ["/edgeft/count"], keepdims=0, name="/edgeft/CountTokens"),
            n("Max", ["/edgeft/count", "edgeft.tiny"], ["/edgeft/count_safe"], name="/edgeft/ClampCount"),
            n("Div", ["/edgeft/sum", "/edgeft/count_safe"], ["/edgeft/mean"], name="/edgeft/Mean"),
        ]
        pooled = "/edgeft/mean"
        if pooling == "mean-normalized":
            nodes += [
                n("Mul", [pooled, pooled], ["/edgeft/sq"], name="/edgeft/Square"),
                n("ReduceSum", ["/edgeft/sq", "edgeft.axis_last"], ["/edgeft/sqsum"], keepdims=1, name="/edgeft/SumSquares"),
                n("Sqrt", ["/edgeft/sqsum"], ["/edgeft/norm"], name="/edgeft/Norm"),
                n("Max", ["/edgeft/norm", "edgeft.norm_eps"], ["/edgeft/norm_safe"], name="/edgeft/ClampNorm"),
                n("Div", [pooled, "/edgeft/norm_safe"], ["/edgeft/normalized"], name="/edgeft/Normalize"),
            ]
            pooled = "/edgeft/normalized"
    elif pooling == "cls":
        c("edgeft.zero", np.array(0, dtype=np.int64))
        nodes += [n("Gather", [hidden_output, "edgeft.zero"], ["/edgeft/cls"], axis=1, name="/edgeft/GatherCLS")]
        pooled = "/edgeft/cls"
    else:
        raise EdgeftError(f"pooling {pooling!r} is not available for ONNX sources (use mean, mean-normalized or cls)")
    nodes += [
        n("Identity", [pooled], ["pooled"], name="/edgeft/Pooled"),
        n("Transpose", ["head.weight"], ["/edgeft/head_t"], name="/edgeft/TransposeHead"),
        n("MatMul", ["pooled", "/edgeft/head_t"], ["/edgeft/logits_nobias"], name="/edgeft/Head"),
        n("Add", ["/edgeft/logits_nobias", "head.bias"], ["logits"], name="/edgeft/HeadBias"),
        n("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], reduction="none", name="/edgeft/Loss"),
    ]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]))
    graph.input.append(helper.make_tensor_value_info("head.weight", TensorProto.FLOAT, [num_labels, hidden_size]))
    graph.input.append(helper.make_tensor_value_info("head.bias", TensorProto.FLOAT, [num_labels]))
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("loss", TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden_size]),
    ])
    specs = [
        AdapterTensor("head.weight", [num_labels, hidden_size], "probe", None, None, "head_weight"),
        AdapterTensor("head.bias", [num_labels], "probe", None, None, "head_bias"),
    ]
    return model, specs


def _drop_token_type_ids(graph) -> None:
    """BERT exports take token_type_ids; edgeft feeds single segments, i.e. zeros of input_ids' shape."""
    names = [i.name for i in graph.input]
    if "token_type_ids" not in names:
        return
    keep = [i for i in graph.input if i.name != "token_type_ids"]
    del graph.input[:]
    graph.input.extend(keep)
    graph.node.insert(0, helper.make_node("Shape", ["input_ids"], ["/edgeft/ids_shape"], name="/edgeft/IdsShape"))
    graph.node.insert(1, helper.make_node("ConstantOfShape", ["/edgeft/ids_shape"], ["token_type_ids"],
                                          value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]), name="/edgeft/ZeroTypes"))


def read_source(path: Path) -> tuple[onnx.ModelProto, dict]:
    """The ONNX model and the config.json beside it (architecture, sentence-transformers pooling)."""
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise EdgeftError(f"{path}: not a readable ONNX file ({str(err).splitlines()[0][:200]})") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise EdgeftError(f"{path}: opset {opset} is too old for the loss pass (needs 13 or newer)")
    config_path = Path(path).parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    names = [i.name for i in model.graph.input]
    if "input_ids" not in names or "attention_mask" not in names:
        raise EdgeftError(f"{path}: expected inputs input_ids and attention_mask, found {', '.join(names)}")
    return model, config


def export_from_onnx(source: Path, out: Path, options, verify: bool = True) -> dict:
    """Bundle from an existing ONNX encoder (+ tokenizer.json and config.json beside it)."""
    import shutil

    from edgeft.manifest import MODEL_NAME, TOKENIZER_NAME, AdapterSpec, Manifest

    from .bundle import write_bundle
    from .loading import _sentence_transformers_pooling
    from .adapters import DEFAULT_TARGETS

    if options.adapter != "lora" or options.init != "zeros":
        raise EdgeftError("ONNX sources take --adapter lora with its zero init only (export other adapters from the HF model)")
    if options.task != "classification":
        raise EdgeftError("ONNX sources support --task classification only (export prompt/causal-lm from the HF model)")
    original, config = read_source(source)
    tokenizer_path = source.parent / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        raise EdgeftError(f"{source.parent}: no {TOKENIZER_NAME} beside the ONNX file")
    architecture = config.get("model_type", "unknown")
    targets = options.targets or DEFAULT_TARGETS.get(architecture)
    if not targets:
        raise EdgeftError(f"no default LoRA targets for architecture {architecture!r}: pass --targets")
    st_pooling, normalize = _sentence_transformers_pooling(source.parent)
    pooling = options.pooling or ({"mean": "mean-normalized" if normalize else "mean"}.get(st_pooling, st_pooling) or "cls")
    model, lora = add_lora_inputs(original, targets, options.rank, options.alpha)
    model, head = add_classification_loss(model, len(options.labels), pooling)
    tensors = lora + head
    manifest = Manifest(
        task="classification", source=str(source), architecture=architecture,
        adapter=AdapterSpec("lora", options.rank, options.alpha, list(targets), tensors),
        inputs=[i.name for i in model.graph.input], outputs=["loss", "logits", "pooled"],
        labels=list(options.labels), pooling=pooling, max_length=options.max_length,
        pad_token_id=int(config.get("pad_token_id") or 0), opset=max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        peft_base={"auto_class": "AutoModel", "source": str(source.parent), "gguf_file": None},
    )
    manifest.validate()
    if fits_in_memory(model):  # the checker serialises the graph: over 2 GB, ORT's load below checks it
        onnx.checker.check_model(model)

    def write(tmp: Path) -> dict:
        save_model(model, tmp / MODEL_NAME)
        shutil.copy(tokenizer_path, tmp / TOKENIZER_NAME)
        manifest.save(tmp)
        return verify_no_op(source, tmp, manifest, int(config.get("vocab_size") or 100)) if verify else {}

    return write_bundle(out, write)


def verify_no_op(source: Path, bundle_dir: Path, manifest, vocab: int) -> dict:
    """With B = 0 the surgery must not change the encoder: pooled features vs the original graph
    (pooled in numpy), at batch 3 and sequence 11."""
    import onnxruntime as ort

    from .bundle import random_adapters, sample_batch

    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    patched = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = sample_batch(manifest, vocab, batch=3, seq=11, seed=1)
    adapters = random_adapters(manifest, seed=1)
    for t in manifest.adapter.tensors:
        if t.role == "lora_B":
            adapters[t.name][...] = 0.0
    base_feeds = {k: v for k, v in feeds.items() if k in {i.name for i in original.get_inputs()}}
    if "token_type_ids" in {i.name for i in original.get_inputs()}:
        base_feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    hidden = original.run(["last_hidden_state"], base_feeds)[0].astype(np.float64)
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    if manifest.pooling == "cls":
        want = hidden[:, 0]
    else:
        want = (hidden * mask).sum(1) / mask.sum(1)
        if manifest.pooling == "mean-normalized":
            want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    got = patched.run(["pooled"], {**feeds, **adapters})[0]
    return {"pooled (B = 0 vs original graph)": float(np.abs(got - want).max())}
