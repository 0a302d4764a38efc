"""Deploy passes: merge, ORT adapter file, int8 — each checked against the unmerged fp32 bundle."""

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.export.deploy import run_deployed

TEXTS_A = ["the movie was great", "i hated this film it is boring", "a good story"]
TEXTS_B = ["the plot was dull and the acting was bad and the music was terrible", "fun", "loved it", "not good",
           "the scene was great and the actor was good"]


@pytest.fixture(scope="module")
def trained(bert_bundle, sentiment_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("deploy") / "run"
    args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run), "--steps", "15",
            "--batch-size", "4", "--lr", "0.05", "--eps", "1e-2", "--json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    return run / "adapter"


def _reference(bundle_dir, adapter_dir, texts):
    from edgeft.adapters import load_adapter
    from edgeft.runtime import Bundle

    b = Bundle(bundle_dir)
    vector = load_adapter(adapter_dir, b.layout)
    enc = b.encode(texts, np.zeros(len(texts), dtype=np.int64))
    feeds = b.feeds(enc, np.arange(len(texts)))
    return feeds, b.run(feeds, vector, ["logits"])[0]


def _assert_runs_like_the_bundle(bundle_dir, adapter_dir, out):
    """The deployed folder, run as an app would, gives the bundle's logits at two input shapes."""
    for texts in (TEXTS_A, TEXTS_B):
        feeds, want = _reference(bundle_dir, adapter_dir, texts)
        (got,) = run_deployed(out, feeds)
        assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter-file"])
def test_deployed_model_matches_bundle_at_two_shapes(bert_bundle, trained, tmp_path, merge):
    from edgeft.export.deploy import deploy

    out = tmp_path / "out"
    report = deploy(bert_bundle, trained, out, merge=merge)
    assert report["logits"] < 1e-4 and report["label_agreement"] == 1.0
    _assert_runs_like_the_bundle(bert_bundle, trained, out)
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert "labels" not in names and [o.name for o in graph.output] == ["logits"]
    if merge:
        assert names == ["input_ids", "attention_mask"]
    else:
        assert (out / "adapter.onnx_adapter").stat().st_size > 0


def test_merge_is_a_no_op_with_zero_adapters(bert_bundle, tmp_path):
    """B = 0 and a zero head: the merged graph's logits are the unmerged ones (all zero)."""
    from edgeft.adapters import AdapterLayout, save_adapter
    from edgeft.export.deploy import deploy
    from edgeft.manifest import Manifest

    layout = AdapterLayout(Manifest.load(bert_bundle).adapter)
    save_adapter(tmp_path / "zero", layout, layout.initial(0), "tiny", None)
    report = deploy(bert_bundle, tmp_path / "zero", tmp_path / "out", merge=True)
    assert report["logits"] == 0.0


def test_int8_deploy_and_training_on_an_int8_base(bert_bundle, trained, sentiment_data, tmp_path):
    result = CliRunner().invoke(main, ["deploy", str(bert_bundle), "--adapter", str(trained), "-o",
                                       str(tmp_path / "q"), "--merge", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "check: label_agreement" in result.output
    # an int8 base keeps its adapters as inputs and trains
    result = CliRunner().invoke(main, ["compress", str(bert_bundle), "-o", str(tmp_path / "b8"), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "b8" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, starting_adapter
    from tests.models import SENTIMENT

    b = Bundle(tmp_path / "b8")
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta = b.layout.initial(0)
    opt = MeZO(theta, MeZOConfig(lr=0.05, eps=1e-2, queries=4, total_steps=40))
    trainer = Trainer(b, enc, opt, TrainConfig(steps=40, batch_size=12, eval_every=40))
    start = trainer.evaluate()["loss"]
    trainer.fit()
    assert trainer.evaluate()["loss"] < start - 0.02
    # and it agrees with the fp32 bundle to int8 precision
    fp32 = Bundle(bert_bundle)
    feeds = b.feeds(enc, np.arange(len(enc)))
    probe, _ = starting_adapter(fp32, enc)
    diff = np.abs(b.run(feeds, probe, ["logits"])[0] - fp32.run(feeds, probe, ["logits"])[0]).max()
    assert diff < 0.5


def test_export_with_quantize_writes_both_bundles(bert_folder, tmp_path):
    from edgeft.runtime import Bundle

    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["export", str(bert_folder), "-o", str(out), "--labels", "neg,pos",
                                       "--quantize", "int8", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert "verify: logits" in result.output
    fp32, int8 = Bundle(out), Bundle(tmp_path / "b-int8")
    assert fp32.layout.names() == int8.layout.names()
    assert (tmp_path / "b-int8" / "model.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_merged_causal_lm_returns_next_token_logits(llama_lm_bundle, tmp_path):
    """Causal-LM bundle → merged model with inputs input_ids, attention_mask and output logits, equal to the
    unmerged bundle's logits (non-zero LoRA values) at two input shapes."""
    import onnx

    from edgeft.adapters import AdapterLayout, save_adapter
    from edgeft.export.deploy import deploy
    from edgeft.manifest import Manifest
    from edgeft.runtime import Bundle

    manifest = Manifest.load(llama_lm_bundle)
    assert manifest.outputs[:3] == ["loss", "token_count", "logits"] and manifest.top_blocks is not None
    layout = AdapterLayout(manifest.adapter)
    vector = (np.random.default_rng(0).standard_normal(layout.size) * 0.1).astype(np.float32)
    save_adapter(tmp_path / "adapter", layout, vector, "tiny", "CAUSAL_LM")
    report = deploy(llama_lm_bundle, tmp_path / "adapter", tmp_path / "out", merge=True)
    assert report["logits"] < 1e-4 and report["next_token_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    assert not [n for n in graph.node if n.op_type in ("SoftmaxCrossEntropyLoss", "LogSoftmax")]
    b = Bundle(llama_lm_bundle)
    for texts in (TEXTS_A, TEXTS_B):
        feeds = b.feeds(b.encode(texts), np.arange(len(texts)))
        (want,) = b.run(feeds, vector, ["logits"])
        (got,) = run_deployed(tmp_path / "out", feeds)
        assert got.shape == want.shape and got.shape[:2] == feeds["input_ids"].shape
        assert np.abs(got - want).max() < 1e-4


def test_int8_keeps_gated_ffn_down_projections_fp32(llama_lm_bundle, bert_bundle, tmp_path):
    """Llama and BERT: by default the feed-forward down projections (one per layer) stay fp32, every other
    frozen MatMul goes int8; keep_fp32=[] quantises them too."""
    import onnx

    from edgeft.export.compress import quantize_bundle
    from edgeft.export.lord import linear_weights
    from edgeft.runtime import Bundle, evaluate
    from tests.models import CORPUS

    fp32_left = lambda folder: [w.dims for _, w in linear_weights(onnx.load(str(folder / "model.onnx")))]
    quantize_bundle(llama_lm_bundle, tmp_path / "q")
    assert fp32_left(tmp_path / "q") == [[64, 32], [64, 32]]  # down_proj [intermediate, hidden] of both layers
    quantize_bundle(llama_lm_bundle, tmp_path / "all", keep_fp32=[])
    assert fp32_left(tmp_path / "all") == []
    quantize_bundle(bert_bundle, tmp_path / "bert")
    assert fp32_left(tmp_path / "bert") == [[64, 32], [64, 32]]  # output.dense [intermediate, hidden]
    quantize_bundle(bert_bundle, tmp_path / "bert-all", keep_fp32=[])
    assert fp32_left(tmp_path / "bert-all") == []
    ref, q = Bundle(llama_lm_bundle), Bundle(tmp_path / "q")
    theta = ref.layout.initial(0)
    want, got = (evaluate(b, theta, b.encode(CORPUS[:5]), 8)["loss"] for b in (ref, q))
    assert abs(got - want) < 0.05


def test_merge_into_lord_factors_is_exact_at_two_shapes(bert_bundle, trained, tmp_path):
    """A LoRA on a LoRD layer folds into its factors, [W1 | s·Aᵀ]·[W2 ; Bᵀ], still two thin MatMuls."""
    import onnx

    from edgeft.export.compress import compress_bundle
    from edgeft.export.deploy import deploy

    lord_bundle = tmp_path / "lord"
    compress_bundle(bert_bundle, lord_bundle, params_ratio=0.5, log=lambda m: None)
    out = tmp_path / "merged"
    report = deploy(lord_bundle, trained, out, merge=True)
    assert report["logits"] < 1e-4 and report["label_agreement"] == 1.0
    _assert_runs_like_the_bundle(lord_bundle, trained, out)
    before = {i.name: list(i.dims) for i in onnx.load(str(lord_bundle / "model.onnx")).graph.initializer}
    after = {i.name: list(i.dims) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    grown = [name for name in after if name.endswith(".lord_in") and after[name][1] == before[name][1] + 8]
    assert grown, "no LoRD factor took the rank-8 LoRA"


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter-file"])
def test_ort_format_for_phones_matches_the_bundle_at_two_shapes(bert_bundle, trained, tmp_path, merge):
    """``--format ort``: ONNX Runtime's converter output, loaded and run by ONNX Runtime here as ORT Mobile
    would load it (with the adapter file when not merged)."""
    result = CliRunner().invoke(main, ["deploy", str(bert_bundle), "--adapter", str(trained), "-o", str(tmp_path / "ort"),
                                       "--format", "ort", *(["--merge"] if merge else [])])
    assert result.exit_code == 0 and "label_agreement 1" in result.output, result.output
    out = tmp_path / "ort"
    assert (out / "model.ort").stat().st_size > 0 and not (out / "model.onnx").exists()
    assert (out / "required_operators.config").is_file()
    _assert_runs_like_the_bundle(bert_bundle, trained, out)


def test_int4_base_matches_fp32_to_int4_precision_and_trains(llama_lm_bundle, tmp_path):
    """compress --quantize int4: MatMulNBits frozen weights (ONNX Runtime's quantiser), adapters still fp32
    graph inputs; next-token logits track the fp32 bundle's at two shapes, and MeZO lowers the loss."""
    import onnx

    from edgeft.export.bundle import random_adapters, sample_batch
    from edgeft.manifest import Manifest
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer
    from tests.models import CORPUS

    out = tmp_path / "b4"
    result = CliRunner().invoke(main, ["compress", str(llama_lm_bundle), "-o", str(out), "--quantize", "int4"])
    assert result.exit_code == 0 and "int4 bundle written" in result.output, result.output
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 4
    fp32, int4 = Bundle(llama_lm_bundle), Bundle(out)
    assert fp32.layout.names() == int4.layout.names()
    manifest = Manifest.load(llama_lm_bundle)
    vector = fp32.layout.flatten(random_adapters(manifest, seed=1))
    for batch, seq in ((2, 7), (3, 13)):
        feeds = sample_batch(manifest, 60, batch, seq, seed=seq)
        want, got = fp32.run(feeds, vector, ["logits"])[0], int4.run(feeds, vector, ["logits"])[0]
        assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99
        assert 0 < np.abs(got - want).max() < 0.2 * np.abs(want).max()  # quantised, and close
    enc = int4.encode(CORPUS[:12])
    opt = MeZO(int4.layout.initial(0), MeZOConfig(lr=0.05, eps=1e-2, queries=4, total_steps=30))
    trainer = Trainer(int4, enc, opt, TrainConfig(steps=30, batch_size=12, eval_every=30))
    start = trainer.evaluate()["loss"]
    trainer.fit()
    assert trainer.evaluate()["loss"] < start


def test_int8_quantises_embedding_tables_unless_shared(bert_bundle, tmp_path):
    """A lookup table read by its Gather alone goes int8 (BERT's word, position and type tables); one that
    a tied LM head also reads stays fp32 and is stored once (an int8 copy beside it would only add bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export.compress import quantize_bundle
    from edgeft.export.quantize import quantize_int8

    def table_types(path):
        model = onnx.load(str(path))
        types = {t.name: t.data_type for t in model.graph.initializer}
        return [types[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in types]

    quantize_bundle(bert_bundle, tmp_path / "bert")
    before, after = table_types(bert_bundle / "model.onnx"), table_types(tmp_path / "bert" / "model.onnx")
    one_byte = {TensorProto.INT8, TensorProto.UINT8}  # ORT stores a quantised lookup in the activation type
    assert len(before) >= 2 and len(after) == len(before) and set(after) <= one_byte

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32), "table")
    for tied in (False, True):
        nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="lookup")]
        outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 16])]
        if tied:
            nodes += [helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0], name="head_t"),
                      helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head")]
            outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 300])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                                  outputs, [table])
        src, dst = tmp_path / f"tied{tied}.onnx", tmp_path / f"tied{tied}-int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
        quantize_int8(src, dst, None)
        stored = [t.data_type for t in onnx.load(str(dst)).graph.initializer if t.dims and t.dims[0] == 300]
        assert stored == [TensorProto.FLOAT] if tied else len(stored) == 1 and stored[0] in one_byte


def _lora_ready_graph(path, pairs):
    """A model laid out as ORT GenAI's builder and Olive lay out LoRA: per module y = x·W + (x·A)·B, A [in, r] and
    B [r, out] graph inputs under the file's names (zero defaults), W random and frozen."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inputs, outputs, nodes, inits, frozen = [], [], [], [], {}
    for i, (a_name, b_name, a, b) in enumerate(pairs):
        w = rng.standard_normal((a.shape[0], b.shape[1])).astype(np.float32)
        frozen[i] = w
        inputs += [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [2, a.shape[0]]),
                   helper.make_tensor_value_info(a_name, TensorProto.FLOAT, list(a.shape)),
                   helper.make_tensor_value_info(b_name, TensorProto.FLOAT, list(b.shape))]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, b.shape[1]]))
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros_like(a), a_name),
                  numpy_helper.from_array(np.zeros_like(b), b_name)]
        nodes += [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"base{i}"]),
                  helper.make_node("MatMul", [f"x{i}", a_name], [f"low{i}"]),
                  helper.make_node("MatMul", [f"low{i}", b_name], [f"up{i}"]),
                  helper.make_node("Add", [f"base{i}", f"up{i}"], [f"y{i}"])]
    model = helper.make_model(helper.make_graph(nodes, "lora-ready", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return frozen


def test_adapter_files_under_ort_genai_and_olive_names(llama_lm_bundle, bert_bundle, trained, tmp_path):
    """--also-for genai/olive: the LoRA under those tools' input names and layout, loaded by ONNX Runtime's own
    LoraAdapter into a model laid out as they lay LoRA out, gives the base plus PEFT's update scale·B·A."""
    import json

    import onnxruntime as ort

    from edgeft.adapters import AdapterLayout, save_adapter
    from edgeft.export.deploy import deploy
    from edgeft.manifest import Manifest

    manifest = Manifest.load(llama_lm_bundle)
    layout = AdapterLayout(manifest.adapter)
    vector = (np.random.default_rng(0).standard_normal(layout.size) * 0.1).astype(np.float32)
    save_adapter(tmp_path / "adapter", layout, vector, "tiny", "CAUSAL_LM")
    deploy(llama_lm_bundle, tmp_path / "adapter", tmp_path / "out", also_for=("genai", "olive"))
    info = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert info["left_out_of_foreign_files"] == ["output.bias"]
    values = layout.unflatten(vector)
    modules = [t for t in manifest.adapter.tensors if t.role == "lora_A"]
    expected = {
        "genai": lambda t, ab: t.module.replace("self_attn", "attn") + f".lora_{ab}.MatMul.weight",
        "olive": lambda t, ab: t.module + f".lora_{ab}.weight",  # PEFT's key, base_model.model. dropped
    }
    rng = np.random.default_rng(2)
    for conv, name_of in expected.items():
        path = tmp_path / "out" / info["foreign_adapter_files"][conv]
        params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
        assert set(params) == {name_of(t, ab) for t in modules for ab in "AB"}
        pairs = [(name_of(t, "A"), name_of(t, "B"), params[name_of(t, "A")], params[name_of(t, "B")]) for t in modules]
        frozen = _lora_ready_graph(tmp_path / f"{conv}.onnx", pairs)
        session = ort.InferenceSession(str(tmp_path / f"{conv}.onnx"), providers=["CPUExecutionProvider"])
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        xs = {f"x{i}": rng.standard_normal((2, p[2].shape[0])).astype(np.float32) for i, p in enumerate(pairs)}
        got = session.run(None, xs, options)
        for i, t in enumerate(modules):
            a, b = values[t.name], values[t.name[: -len("lora_A")] + "lora_B"]
            want = xs[f"x{i}"] @ (frozen[i] + manifest.adapter.scale * (b @ a).T)
            assert np.abs(got[i] - want).max() < 1e-4
    runner = CliRunner()
    for args, message in [([str(bert_bundle), "--adapter", str(trained), "--also-for", "genai"], "ORT GenAI's builder names"),
                          ([str(llama_lm_bundle), "--adapter", str(tmp_path / "adapter"), "--also-for", "olive", "--merge"],
                           "a merged deploy has none")]:
        result = runner.invoke(main, ["deploy", *args, "-o", str(tmp_path / "refused")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "refused").exists()


def _on_q4_grid(weight: np.ndarray, kind: str = "q4_1") -> np.ndarray:
    """[out, in] weights snapped to GGUF's Q4_1 (or Q4_0) grid per block of 32 inputs, d and m in fp16 as GGUF
    stores them, dequantised in fp32 as GGUF readers do."""
    out, k = weight.shape
    blocks = weight.reshape(out, k // 32, 32).astype(np.float32)
    if kind == "q4_1":
        m = blocks.min(-1).astype(np.float16).astype(np.float32)
        d = ((blocks.max(-1) - m) / 15).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((blocks - m[..., None]) / d[..., None]), 0, 15)
        return (d[..., None] * q + m[..., None]).astype(np.float32).reshape(out, k)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    d = (extreme / -8).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blocks / d[..., None] + 8), 0, 15)
    return (d[..., None] * (q - 8)).astype(np.float32).reshape(out, k)


def test_weights_on_a_gguf_4bit_grid_convert_to_int4_without_rounding(tmp_path):
    """Q4_1 and Q4_0 blocks (fp16 scales, fp32 dequantisation) are recovered exactly; weights off a grid are
    left to the quantiser; the converted MatMulNBits graph equals the fp32 MatMul at two input shapes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export.exact_int4 import convert_exact_int4, grid_of

    rng = np.random.default_rng(0)
    raw = rng.standard_normal((48, 96)).astype(np.float32)  # [out, in]
    for kind in ("q4_1", "q4_0"):
        w = _on_q4_grid(raw, kind)
        w[0, :32] = 0.25  # a constant block
        packed, scales, offsets = grid_of(w.T)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(48, 3, 32).astype(np.float32)
        back = (q - 8) * scales.reshape(48, 3, 1) + offsets.T[..., None]
        assert np.abs(back.reshape(48, 96) - w).max() <= 1e-6 * np.abs(w).max()
        assert kind == "q4_1" or not np.any(offsets[:, 1:])  # Q4_0 is symmetric: no offsets (but the constant block)
    assert grid_of(raw.T) is None and grid_of(_on_q4_grid(raw)[:, :80].T) is None  # off the grid; 80 inputs: no blocks
    nearly = _on_q4_grid(raw)
    nearly[5, 7] += 1e-3  # one value off its grid: the weight stays for the quantiser
    assert grid_of(nearly.T) is None

    weight = _on_q4_grid(raw)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g", [x], [y],
                              [numpy_helper.from_array(weight.T.copy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert convert_exact_int4(model, exclude=set()) == (["linear"], ["linear/block_sums", "linear/offsets"])
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    assert not any(t.name == "w" for t in model.graph.initializer)
    onnx.save(model, str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((2, 96), (3, 5, 96)):
        xs = rng.standard_normal(shape).astype(np.float32)
        assert np.abs(session.run(["y"], {"x": xs})[0] - xs @ weight.T).max() < 1e-4


def _on_q8_grid(table: np.ndarray) -> np.ndarray:
    """[rows, K] values snapped to GGUF's Q8_0 grid per block of 32 along K (fp16 scale), dequantised in fp32."""
    rows, k = table.shape
    blocks = table.reshape(rows, k // 32, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1) / 127).astype(np.float16).astype(np.float32)
    d = np.where(d > 0, d, 1.0)  # an all-zero block (the padding token's row) stays zero
    return (np.rint(blocks / d[..., None]) * d[..., None]).astype(np.float32).reshape(rows, k)


def test_tables_on_a_q8_grid_are_recovered_exactly():
    from edgeft.export.exact_tables import q8_grid

    raw = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    table = _on_q8_grid(raw)
    table[3, 32:] = 0.0  # an all-zero block
    data, scales = q8_grid(table)
    assert data.dtype == np.uint8 and scales.shape == (40, 2)
    back = ((data.astype(np.float32) - 128).reshape(40, 2, 32) * scales[..., None]).reshape(40, 64)
    assert np.array_equal(back, table)
    nearly = table.copy()
    nearly[7, 9] += 1e-3  # one value off its grid
    assert q8_grid(raw) is None and q8_grid(nearly) is None and q8_grid(table[:, :48]) is None  # 48: no whole blocks


def test_int4_of_a_gguf_style_model_is_lossless(llama_folder, export_bundle_for, tmp_path):
    """A Llama whose linear weights lie on GGUF's Q4_1 grid and whose tied embedding lies on its Q8_0 grid (as
    such a GGUF dequantises): compress --quantize int4 converts every frozen linear layer, down projections too,
    stores the table once as bytes for both the lookup and the LM head, and the logits equal the fp32 bundle's."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.export.bundle import random_adapters, sample_batch
    from edgeft.manifest import Manifest
    from edgeft.runtime import Bundle

    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(torch.from_numpy(_on_q4_grid(module.weight.numpy())))
        embedding = model.get_input_embeddings().weight
        embedding.copy_(torch.from_numpy(_on_q8_grid(embedding.numpy())))  # tied: the LM head's weight too
    folder = tmp_path / "q4-llama"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama_folder).save_pretrained(folder)
    bundle = export_bundle_for("q4-llama-lm", folder, task="causal-lm")
    out = tmp_path / "b4"
    result = CliRunner().invoke(main, ["compress", str(bundle), "-o", str(out), "--quantize", "int4"])
    assert result.exit_code == 0, result.output
    linear = sum(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert f"int4: {linear} frozen MatMuls were already on a 4-bit grid" in result.output
    assert "1 embedding table on an 8-bit grid stored as bytes" in result.output
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == linear
    vocab, hidden = embedding.shape
    # one uint8 table, read by the lookup and the head's dequantisation; no fp32 copy of it is left
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 2
    assert [list(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [vocab, hidden]] == [[vocab, hidden]]
    assert not any(sorted(t.dims) == sorted([vocab, hidden]) and t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    fp32, int4 = Bundle(bundle), Bundle(out)
    manifest = Manifest.load(bundle)
    vector = fp32.layout.flatten(random_adapters(manifest, seed=1))
    for batch, seq in ((2, 7), (3, 13)):
        feeds = sample_batch(manifest, 60, batch, seq, seed=seq)
        want, got = fp32.run(feeds, vector, ["logits"])[0], int4.run(feeds, vector, ["logits"])[0]
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    # int8 stores the same table the same way (its MatMuls are rounded: only the table is exact)
    result = CliRunner().invoke(main, ["compress", str(bundle), "-o", str(tmp_path / "b8"), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(tmp_path / "b8" / "model.onnx")).graph
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 2
    assert not any(sorted(t.dims) == sorted([vocab, hidden]) and t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)
    int8 = Bundle(tmp_path / "b8")
    feeds = sample_batch(manifest, 60, 2, 7, seed=7)
    want, got = fp32.run(feeds, vector, ["logits"])[0], int8.run(feeds, vector, ["logits"])[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_int8_weights_do_not_saturate_on_cpus_without_vnni(tmp_path):
    """u8 activations × s8 weights summed in pairs into int16 (AVX2's vpmaddubsw) saturate at full 8-bit range:
    positive activations and weights at both ends of their range are the worst case. With the default 7-bit
    weights the int8 MatMul stays within int8's rounding of fp32 on any CPU (full range, on this AVX2 machine:
    49% off; 7 bits: 0.1%)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    weight = np.sign(rng.standard_normal((64, 16))).astype(np.float32)  # every weight at ±max
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="frozen")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    x = np.concatenate([np.zeros((1, 64)), rng.uniform(0.95, 1.0, (7, 64))]).astype(np.float32)  # u8 near 255
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", None, keep_fp32=[])
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node)
    got = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ weight
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
