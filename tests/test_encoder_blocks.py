"""The encoder classifier's exact-gradient fit: the numpy forward and backward of BERT layers, pooling and
head against torch autograd and the bundle graph, and the bundle's contract (manifest, weights file)."""

import numpy as np
import pytest

from edgeft.runtime import Bundle
from edgeft.runtime.encoder_blocks import EncoderBlocksFit, gelu, gelu_derivative


def _torch_reference(model_folder, manifest, feeds, values):
    """Summed cross-entropy and its autograd gradient for every adapter tensor, in torch, the adapters
    injected as the exporter injects them."""
    import torch

    from export.adapters import inject_adapters
    from export.loading import load_source
    from export.tasks import Classification

    src = load_source(str(model_folder), "classification", None)
    spec = manifest.adapter
    from edgeft.adapters import layer_of

    adapted = {layer_of(t.name) for t in spec.tensors if layer_of(t.name) >= 0}  # --layers top:N: those only
    slots, _, _ = inject_adapters(src.model, spec.targets, spec.kind, spec.rank, spec.alpha, layers=adapted)
    names = [t.name for t in spec.tensors]
    wrapper = Classification(src.model, slots, names, manifest.pooling)
    wrapper.eval()
    adapters = [torch.tensor(np.asarray(values[n]), dtype=torch.float32, requires_grad=True) for n in names]
    loss, logits, *_ = wrapper(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "labels")), *adapters)
    total = loss.sum()
    total.backward()
    return float(total.detach()), logits.detach().numpy(), {n: a.grad.double().numpy() for n, a in zip(names, adapters)}


def _feeds(rng, batch, length, labels=2):
    ids = rng.integers(5, 60, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, length // 2 + 1 :] = 0  # right padding, as Bundle.feeds pads
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, labels, size=batch).astype(np.int64)}


def _cached(bundle, fit, feeds, theta):
    (hidden,) = bundle.run(feeds, theta, [fit.input])
    return [hidden[r, : int(m.sum())] for r, m in enumerate(feeds["attention_mask"])]


@pytest.mark.parametrize("pooling, batch, length, layers", [("mean", 2, 7, None), ("mean", 3, 12, None),
                                                            ("mean-normalized", 3, 9, None), ("cls", 10, 6, None),
                                                            ("mean", 3, 8, "top:1")])
def test_encoder_gradients_equal_torch_autograd(export_bundle_for, bert_folder, pooling, batch, length, layers):
    """Both layers of the tiny BERT are fitted (the lowest one's input is the embeddings), or the top one (its
    input read from the graph); every adapter value non-zero (B ≠ 0, or dA would be trivially zero); batch 10
    spans several chunks of ROWS."""
    b = Bundle(export_bundle_for(f"bert-cls-{pooling}-{layers}", bert_folder, task="classification", labels=["neg", "pos"],
                                 pooling=pooling, layers=layers))
    top = b.manifest.encoder_blocks
    fitted = [1] if layers else [0, 1]
    assert top is not None and top.layers == fitted and top.input == f"hidden.{fitted[0]}"
    fit = EncoderBlocksFit(b.folder, b.manifest)
    assert len(fit.tensor_names()) == len(fitted) * 2 * 2 + 2  # q, v LoRA per layer, the head
    rng = np.random.default_rng(batch)
    feeds = _feeds(rng, batch, length)
    theta = (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)
    named = b.layout.unflatten(theta)
    hidden = _cached(b, fit, feeds, theta)
    got = {n: np.zeros(named[n].shape) for n in fit.tensor_names()}
    loss, correct = fit.accumulate(hidden, feeds["labels"], np.arange(batch), named, got)
    total, logits, want = _torch_reference(bert_folder, b.manifest, feeds, {k: np.array(v) for k, v in named.items()})
    np.testing.assert_allclose(loss, total, rtol=1e-4)
    assert correct == int((logits.argmax(1) == feeds["labels"]).sum())
    for name in fit.tensor_names():
        scale = np.abs(want[name]).max()
        assert scale > 1e-6, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def _fit_and_graph_logits(b, fit):
    """(the fit's logits, the graph's) at two shapes, random adapters."""
    rng = np.random.default_rng(5)
    theta = (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)
    for batch, length in ((4, 13), (9, 30)):
        feeds = _feeds(rng, batch, length)
        (logits,) = b.run(feeds, theta, ["logits"])
        yield fit.logits(_cached(b, fit, feeds, theta), np.arange(batch), b.layout.unflatten(theta)), logits


def test_encoder_forward_reproduces_the_graphs_logits(bert_bundle):
    """The numpy layers, pooling and head give the graph's logits (ORT), at two shapes."""
    b = Bundle(bert_bundle)
    for got, logits in _fit_and_graph_logits(b, EncoderBlocksFit(b.folder, b.manifest)):
        np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantised_bundles_fit_runs_its_graphs_weights_as_codes(bert_bundle, tmp_path, bits):
    """compress stores the encoder fit's matrices and embedding tables as the compressed graph holds them (int8:
    8-bit codes, its tables' own; int4: 4-bit, tables fp32; the down projections fp32 as in the graph), so the fit
    still embeds the tokens itself, the graph's hidden.0 at two shapes; int4 (weights only) then gives the
    compressed graph's logits to float precision, int8 (which also rounds activations) near them."""
    from edgeft.block_weights import BlockWeight
    from edgeft.export.compress import quantize_bundle
    from edgeft.tensor_file import read_tensors

    folder = tmp_path / bits
    quantize_bundle(bert_bundle, folder, bits=bits)
    b = Bundle(folder)
    fit = EncoderBlocksFit(b.folder, b.manifest)
    assert fit.embedding is not None and isinstance(fit.weights[f"{fit.embedding}.word"], BlockWeight) == (bits == "int8")
    rng = np.random.default_rng(2)
    for batch, length in ((2, 5), (5, 31)):
        feeds = _feeds(rng, batch, length)
        for row, cached in enumerate(_cached(b, fit, feeds, b.layout.initial(0))):
            np.testing.assert_allclose(fit.embed(feeds["input_ids"][row, : len(cached)]), cached, rtol=1e-5, atol=1e-5)
    layer = fit.layers[0]
    assert isinstance(fit.weights[f"{layer}.q"], BlockWeight) and not isinstance(fit.weights[f"{layer}.down"], BlockWeight)
    stored, fp32 = (read_tensors(f / b.manifest.encoder_blocks.weights) for f in (folder, bert_bundle))
    matrices = [f"{i}.{r}" for i in fit.layers for r in ("q", "k", "v", "o", "up")]
    coded = sum(v.nbytes for n, v in stored.items() if n.rsplit(".", 1)[0] in matrices)  # codes + scales
    # 1 byte a weight + a 4-byte scale a row of 32 here (int8), half a byte + a scale per 16 (int4), against 4
    assert coded < (0.35 if bits == "int8" else 0.25) * sum(fp32[n].nbytes for n in matrices)
    for got, logits in _fit_and_graph_logits(b, fit):
        if bits == "int4":
            np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-5)
        else:
            # here 6e-4 off (the activations' rounding); with the fp32 originals 4.6e-3
            np.testing.assert_allclose(got, logits, rtol=0, atol=2e-3)


def test_numpy_embeddings_equal_the_graphs_hidden_0(bert_bundle):
    """Where the fit starts at the bottom layer it embeds the tokens itself (no graph pass): the graph's hidden.0, at two shapes."""
    b = Bundle(bert_bundle)
    fit = EncoderBlocksFit(b.folder, b.manifest)
    assert fit.embedding is not None
    rng = np.random.default_rng(2)
    theta = b.layout.initial(0)
    for batch, length in ((2, 5), (5, 31)):
        feeds = _feeds(rng, batch, length)
        for row, cached in enumerate(_cached(b, fit, feeds, theta)):
            np.testing.assert_allclose(fit.embed(feeds["input_ids"][row, : len(cached)]), cached, rtol=1e-5, atol=1e-5)


def test_gelu_is_the_erf_one():
    import torch

    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    t = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.gelu(t)
    y.sum().backward()
    # within a few float32 ulps; the tanh approximation is off by up to 5e-4
    np.testing.assert_allclose(gelu(x), y.detach().numpy(), rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(gelu_derivative(x), t.grad.numpy(), rtol=1e-6, atol=1e-6)


# --- the fit and the runs that use it ---------------------------------------------------------


def _train(bundle, data, run, *extra):
    import json

    from click.testing import CliRunner

    from edgeft.cli import main

    result = CliRunner().invoke(main, ["train", str(bundle), "--data", str(data), "-o", str(run), "--json",
                                       "--batch-size", "4", "--eval-every", "4", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_fit_lowers_the_loss_keeps_its_best_held_out_point_and_is_deterministic(bert_bundle, sentiment_data):
    from edgeft.data import load_dataset
    from edgeft.runtime import evaluate, starting_adapter
    from edgeft.runtime.encoder_fit import EncoderFitConfig, fit_encoder
    from edgeft.runtime.probe import CALIBRATION_TEMPERATURES

    b = Bundle(bert_bundle)
    data = load_dataset(sentiment_data, b.labels)
    enc = b.encode(data.texts, data.labels)
    held = b.encode(data.texts[:6], data.labels[:6])
    theta, _ = starting_adapter(b, enc, 0)
    config = EncoderFitConfig(steps=12, lr=1e-2)
    fitted, losses, info = fit_encoder(b, enc, theta, 4, 0, config, held, eval_every=4)
    assert len(losses) == 12 and info["forward_passes"] == 12
    assert [k for k, _ in info["evals"]] == [0, 4, 8, 12]
    best = max(info["evals"], key=lambda e: (e[1]["accuracy"], -e[1]["loss"]))
    assert info["best_step"] == best[0]
    # the numpy score of the kept point is the graph's
    np.testing.assert_allclose(evaluate(b, fitted, held, 32)["loss"], best[1]["loss"], rtol=1e-4)
    # calibrated: the same point, its head scaled by the held-out temperature; no prediction changes, the loss
    # cannot rise (τ = 1 is on the grid), and the graph scores the scaled head as the fit reports it
    scaled, _, calibrated = fit_encoder(b, enc, theta, 4, 0, config, held, eval_every=4, calibrate=True)
    t = calibrated["temperature"]
    assert calibrated["best_step"] == info["best_step"] and t in CALIBRATION_TEMPERATURES
    for name in ("head.weight", "head.bias"):
        np.testing.assert_array_equal(b.layout.unflatten(scaled)[name], b.layout.unflatten(fitted)[name] * np.float32(t))
    graph = evaluate(b, scaled, held, 32)
    np.testing.assert_allclose(graph["loss"], calibrated["returned"]["loss"], rtol=1e-4)
    assert graph["accuracy"] == best[1]["accuracy"] and graph["loss"] <= best[1]["loss"] + 1e-6
    assert calibrated["start"]["loss"] <= info["evals"][0][1]["loss"] + 1e-6
    longer = EncoderFitConfig(steps=63, lr=3e-2)
    last, _, _ = fit_encoder(b, enc, theta, 4, 0, longer)  # no held-out data: the last point
    assert evaluate(b, last, enc, 32)["loss"] < 0.5 * evaluate(b, theta, enc, 32)["loss"]
    again, _, _ = fit_encoder(b, enc, theta, 4, 0, longer)
    other, _, _ = fit_encoder(b, enc, theta, 4, 1, longer)
    assert again.tobytes() == last.tobytes() and other.tobytes() != last.tobytes()


def test_auto_spends_a_pass_budget_on_the_encoder_fit(bert_bundle, sentiment_data, tmp_path):
    summary = _train(bert_bundle, sentiment_data, tmp_path / "run", "--budget", "9fwd", "--eval-data", str(sentiment_data))
    fit = summary["output_fit"]
    assert "2 encoder layers" in summary["recipe"] and fit["steps"] == 9  # the layers' input embedded in numpy: no graph pass
    assert summary["forward_passes"] == 9 and summary["steps"] == 0 and summary["stopped_by"] == "budget"
    assert fit["best_step"] == max(fit["evals"], key=lambda e: (e["accuracy"], -e["loss"]))["step"]
    assert summary["start"] == (fit["eval_after"] if fit["kept"] else fit["eval_before"])
    # calibrated on the held-out data: the kept point's loss there at most the uncalibrated one
    kept_loss = {e["step"]: e["loss"] for e in fit["evals"]}[fit["best_step"]]
    assert fit["temperature"] > 0 and fit["eval_after"]["loss"] <= kept_loss + 1e-6


def test_a_named_optimizer_searches_from_the_probe_unless_asked_to_fit(bert_bundle, sentiment_data, tmp_path):
    plain = _train(bert_bundle, sentiment_data, tmp_path / "mezo", "--optimizer", "mezo", "--steps", "2")
    assert plain["output_fit"] is None and plain["forward_passes"] == 4
    fitted = _train(bert_bundle, sentiment_data, tmp_path / "fit", "--optimizer", "mezo", "--steps", "2",
                    "--output-fit-steps", "5")
    assert fitted["output_fit"]["steps"] == 5 and fitted["forward_passes"] == 5 + 4


def test_resume_after_the_encoder_fit_is_bit_identical(bert_bundle, sentiment_data, tmp_path):
    from safetensors.numpy import load_file

    common = ("--optimizer", "mezo", "--output-fit-steps", "5", "--lr", "1e-2")
    _train(bert_bundle, sentiment_data, tmp_path / "full", "--steps", "6", *common)
    _train(bert_bundle, sentiment_data, tmp_path / "split", "--steps", "3", *common)
    _train(bert_bundle, sentiment_data, tmp_path / "split", "--steps", "6", "--resume", *common)
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "arrays.safetensors")) for r in ("full", "split"))
    # (the kept "best" may differ: the split run also scored its step 3, where it stopped)
    assert a["optimizer.theta"].tobytes() == b["optimizer.theta"].tobytes()


def test_export_places_the_fit_where_asked(export_bundle_for, bert_folder):
    from edgeft.manifest import Manifest

    top = Manifest.load(export_bundle_for("bert-cls-top1", bert_folder, task="classification", labels=["neg", "pos"],
                                          pooling="mean", layers="top:1")).encoder_blocks
    assert top.layers == [1] and top.input == "hidden.1" and top.embedding is None  # its input read from the graph
    none = export_bundle_for("bert-cls-nofit", bert_folder, task="classification", labels=["neg", "pos"], pooling="mean",
                             fit_layers=0)
    assert Manifest.load(none).encoder_blocks is None and not (none / "encoder_blocks.safetensors").exists()
    pooler = export_bundle_for("bert-cls-pooler", bert_folder, task="classification", labels=["neg", "pos"], pooling="cls-pooler")
    assert Manifest.load(pooler).encoder_blocks is None  # the pooler's tanh head is not reproduced: no fit


def test_bad_encoder_weights_or_manifest_get_one_line_errors(bert_bundle, sentiment_data, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.errors import EdgeftError
    from edgeft.manifest import Manifest

    copy = tmp_path / "bundle"
    shutil.copytree(bert_bundle, copy)
    (copy / "encoder_blocks.safetensors").write_bytes(b"not safetensors")
    result = CliRunner().invoke(main, ["train", str(copy), "--data", str(sentiment_data), "-o", str(tmp_path / "run"),
                                       "--budget", "6fwd"])
    assert result.exit_code != 0 and "cannot read the encoder layers' weights" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    raw = json.loads((bert_bundle / "edgeft.json").read_text())
    for field, value in (("modules", [{"q": "x"}, {"q": "y"}]), ("weights", "../outside.safetensors"), ("input", "hidden.9"),
                         ("layers", [0, 2])):
        bad = {**raw, "encoder_blocks": {**raw["encoder_blocks"], field: value}}
        with pytest.raises(EdgeftError, match="encoder_blocks"):
            Manifest.from_dict(bad)
