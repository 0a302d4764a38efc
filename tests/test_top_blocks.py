"""The top blocks' exact-gradient fit: the numpy forward and backward of a Llama's top decoder blocks
against torch autograd, and the bundle's contract (manifest, weights file)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.manifest import Manifest
from edgeft.runtime import Bundle
from edgeft.runtime.top_blocks import TopBlocksFit
from tests.models import record_opened_graphs, torch_lm_reference


def _feeds(rng, batch, length):
    ids = rng.integers(5, 200, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, length // 2 + 1 :] = 0  # right padding, as Bundle.feeds pads
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("batch, length, fitted", [(2, 7, None), (3, 11, None), (3, 9, ["q", "v", "gate", "up", "down"])])
def test_top_blocks_and_bias_gradients_equal_torch_autograd(llama_lm_bundle, llama_folder, batch, length, fitted):
    """Both layers of the tiny Llama are fitted blocks (the lowest one's input is the embeddings), its
    q, v LoRA enter the forward (and are fitted too in the third case: the attention's backward through
    RoPE and the grouped KV heads); every adapter value non-zero (B ≠ 0, or dA would be trivially zero)."""
    b = Bundle(llama_lm_bundle)
    top = b.manifest.top_blocks
    assert top is not None and b.manifest.top_mlp is None and top.layers == [0, 1] and top.input == "hidden.0"
    if fitted:
        top.fitted = fitted
    fit = TopBlocksFit(b.folder, b.manifest)
    assert len(fit.tensor_names()) == 2 * len(top.fitted) * 2
    rng = np.random.default_rng(batch)
    feeds = _feeds(rng, batch, length)
    theta = (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)
    named = b.layout.unflatten(theta)
    (hidden,) = b.run(feeds, theta, fit.outputs)
    got = {n: np.zeros(named[n].shape) for n in fit.tensor_names()}
    got["bias"] = np.zeros(named["output.bias"].shape)
    nll, tokens = fit.accumulate(feeds, hidden, named, got)
    assert tokens == int(feeds["attention_mask"][:, 1:].sum())
    total, want = torch_lm_reference(llama_folder, b.manifest, feeds, {k: np.array(v) for k, v in named.items()})
    np.testing.assert_allclose(nll, total, rtol=1e-4)
    np.testing.assert_allclose(got["bias"], want["output.bias"], rtol=1e-3, atol=1e-5)
    for name in fit.tensor_names():
        scale = np.abs(want[name]).max()
        assert scale > 1e-6, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def test_top_blocks_forward_reproduces_the_graphs_logits(llama_lm_bundle):
    """The numpy blocks, the final norm and the LM head give the graph's logits (ORT), at a third shape."""
    from edgeft.runtime.top_blocks import _rms_norm

    b = Bundle(llama_lm_bundle)
    fit = TopBlocksFit(b.folder, b.manifest)
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(5, 200, size=(1, 13)).astype(np.int64), "attention_mask": np.ones((1, 13), np.int64)}
    theta = (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)
    named = b.layout.unflatten(theta)
    logits, hidden = b.run(feeds, theta, ["logits", *fit.outputs])
    x, rope = hidden[0], fit._rope(13)
    for layer in range(len(fit.layers)):
        x, _ = fit._block(x, layer, named, rope)
    np.testing.assert_allclose(fit._logits(x, named), logits[0], rtol=1e-4, atol=1e-4)
    # the blocks start at layer 0: the fit's own input is the embedding table's rows (no graph at all)
    assert fit.standalone and fit.below is None
    np.testing.assert_allclose(fit.entering(feeds, named), hidden, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def below_bundle(export_bundle_for, workdir):
    """The top 1 of 2 blocks fitted, untied embeddings: the bundle has a graph below the blocks and the
    embedding table in its weights file."""
    from tests.models import tiny_llama

    folder = workdir / "tiny-llama-untied"
    return export_bundle_for("llama-lm-untied-fit1", folder if folder.exists() else tiny_llama(folder, tied=False),
                             task="causal-lm", fit_layers=1)


@pytest.mark.parametrize("batch, length", [(2, 7), (3, 12)])
def test_the_graph_below_the_blocks_and_the_numpy_loss_equal_the_whole_graph(below_bundle, batch, length):
    """ORT on the cut graph (fed numpy's embeddings) against ORT on the whole graph, at two shapes with
    right padding; then the fit's own loss against the graph's in-graph loss."""
    alone, whole = Bundle(below_bundle, open_graph=False), Bundle(below_bundle)
    top = alone.manifest.top_blocks
    assert top.below == "below_top_blocks.onnx" and top.embedding == "embed" and top.input == "hidden.1"
    fit = TopBlocksFit(alone.folder, alone.manifest, alone.below_session)
    assert fit.standalone and not np.array_equal(fit.embedding, fit.weights["lm_head"])
    rng = np.random.default_rng(length)
    feeds = _feeds(rng, batch, length)
    theta = (rng.standard_normal(alone.layout.size) * 0.2).astype(np.float32)  # the layer-0 LoRA under the cut too
    named = alone.layout.unflatten(theta)
    want, loss, count = whole.run(feeds, theta, [top.input, "loss", "token_count"])
    got = fit.entering(feeds, named)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    nll, tokens = fit.score(feeds, got, named)
    assert tokens == int(count.sum())
    np.testing.assert_allclose(nll, float((loss.astype(np.float64) * count).sum()), rtol=1e-4)
    assert alone._session is None and not alone.graph_open


@pytest.fixture
def lm_data(tmp_path):
    from tests.test_output_fit import LM_TEXTS

    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in LM_TEXTS))
    return path


def test_the_default_run_of_a_standalone_fit_never_opens_the_whole_graph(below_bundle, lm_data, tmp_path, monkeypatch):
    """edgeft train's default recipe with a budget: the fit, its held-out scoring and the trainer's ranking run
    without model.onnx; the kept adapter scores on the whole graph as the fit said."""
    from edgeft.runtime import evaluate
    from edgeft.training import TrainRequest, run_training

    opened = record_opened_graphs(monkeypatch)
    summary = run_training(TrainRequest(below_bundle, lm_data, tmp_path / "run", eval_data=lm_data, budget="8fwd",
                                        eval_every=4, progress=False), log=lambda m: None)
    assert opened == ["below_top_blocks.onnx"], opened
    fit = summary["output_fit"]
    assert fit["steps"] == 8 and fit["train_loss_last"] < fit["train_loss_first"] and summary["steps"] == 0
    from edgeft.adapters import load_adapter

    b = Bundle(below_bundle)
    kept = load_adapter(tmp_path / "run" / "adapter", b.layout, base=b.layout.initial(0))
    eval_set = b.encode([json.loads(r)["text"] for r in lm_data.read_text().splitlines()])
    np.testing.assert_allclose(evaluate(b, kept, eval_set, 32)["loss"], summary["best"]["loss"], rtol=1e-4)


def test_a_run_with_a_search_after_the_fit_reads_the_blocks_input_from_the_whole_graph(below_bundle, lm_data, tmp_path,
                                                                                       monkeypatch):
    """--steps (a search follows): the whole graph opens first and the fit reads its input from it, so the graph
    below the blocks is never opened beside it."""
    from edgeft.training import TrainRequest, run_training

    opened = record_opened_graphs(monkeypatch)
    summary = run_training(TrainRequest(below_bundle, lm_data, tmp_path / "run", eval_data=lm_data, steps=2,
                                        output_fit_steps=3, progress=False), log=lambda m: None)
    assert opened == ["model.onnx"], opened
    assert summary["output_fit"]["steps"] == 3 and summary["steps"] == 2


def test_a_missing_or_foreign_graph_below_the_blocks_gets_a_one_line_error(below_bundle, tmp_path):
    folder = _copy(below_bundle, tmp_path)
    (folder / "below_top_blocks.onnx").unlink()
    with pytest.raises(EdgeftError, match="below_top_blocks.onnx, which is missing"):
        Bundle(folder, open_graph=False).below_session
    shutil.copy(folder / "model.onnx", folder / "below_top_blocks.onnx")  # a graph, but not the one below the blocks
    with pytest.raises(EdgeftError, match="does not match the manifest"):
        Bundle(folder, open_graph=False).below_session
    (folder / "below_top_blocks.onnx").write_bytes(b"not onnx")
    with pytest.raises(EdgeftError, match="cannot load ONNX graph"):
        Bundle(folder, open_graph=False).below_session
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("below_top_blocks.onnx", "top_blocks.safetensors"):  # a symlink out of the bundle is never followed
        (outside / name).write_bytes((folder / name).read_bytes())
        (folder / name).unlink()
        (folder / name).symlink_to(outside / name)
    b = Bundle(folder, open_graph=False)
    with pytest.raises(EdgeftError, match="links outside the bundle folder"):
        b.below_session
    with pytest.raises(EdgeftError, match="links outside the bundle folder"):
        TopBlocksFit(b.folder, b.manifest)


def _copy(bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder)
    return folder


def test_malformed_top_blocks_manifests_are_refused(llama_lm_bundle, tmp_path):
    raw = json.loads((llama_lm_bundle / "edgeft.json").read_text())
    good = raw["top_blocks"]
    cases = [({"weights": "../top_blocks.safetensors"}, "inside the bundle"), ({"weights": "/etc/passwd"}, "inside the bundle"),
             ({"layers": [0, 2]}, "contiguous"), ({"layers": "01"}, "malformed"), ({"fitted": ["gate", "attn"]}, "roles"),
             ({"heads": 4, "kv_heads": 3}, "impossible sizes"), ({"input": "hidden.7"}, "does not match the graph"),
             ({"modules": [{"q": "x"}, good["modules"][1]]}, "roles"), ({"heads": "four"}, "malformed"),
             ({"below": "../below.onnx"}, "below graph .* inside the bundle"), ({"below": "/tmp/x.onnx"}, "inside the bundle"),
             ({"embedding": 3}, "embedding must name")]
    for change, message in cases:
        raw["top_blocks"] = {**good, **change}
        with pytest.raises(EdgeftError, match=message):
            Manifest.from_dict(raw)
    for bad in ("gate", ["gate"], {"layers": [1]}):
        raw["top_blocks"] = bad
        with pytest.raises(EdgeftError, match="malformed"):
            Manifest.from_dict(raw)


def test_corrupt_or_foreign_top_blocks_weights_get_a_one_line_error(llama_lm_bundle, tmp_path):
    from safetensors.numpy import save_file

    folder = _copy(llama_lm_bundle, tmp_path)
    b = Bundle(folder)
    (folder / "top_blocks.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EdgeftError, match="cannot read the top blocks' weights"):
        TopBlocksFit(b.folder, b.manifest)
    save_file({"lm_head": np.zeros((3, 2), np.float32)}, str(folder / "top_blocks.safetensors"))
    with pytest.raises(EdgeftError, match="has no final_norm"):
        TopBlocksFit(b.folder, b.manifest)
    codes = np.zeros((3, 4), np.int8)
    for tensors, message in (({"lm_head.codes": codes}, "lm_head: has codes but no scales"),
                             ({"lm_head.codes": codes, "lm_head.scales": np.ones((3, 3), np.float32)}, "does not divide"),
                             ({"lm_head.codes": codes.astype(np.int16), "lm_head.scales": np.ones((3, 1), np.float32)}, "int8"),
                             ({"lm_head.scales": np.ones((3, 1), np.float32)}, "has no codes")):
        save_file(tensors, str(folder / "top_blocks.safetensors"))
        with pytest.raises(EdgeftError, match=message):
            TopBlocksFit(b.folder, b.manifest)


def test_the_fit_lowers_the_loss_and_the_search_leaves_its_tensors_alone(llama_lm_bundle):
    from edgeft.adapters import searched_tensors
    from edgeft.runtime.output_fit import OutputFitConfig, fit_lm_output

    b = Bundle(llama_lm_bundle)
    fitted = set(TopBlocksFit(b.folder, b.manifest).tensor_names())
    searched = set(searched_tensors(b.layout, b.manifest))
    assert fitted and not fitted & searched and any("q_proj" in n for n in searched)
    enc = b.encode(["the movie was great and the acting was good", "i hated this film it is boring"])
    start = b.layout.initial(0)
    theta, losses, _ = fit_lm_output(b, enc, start, batch_size=2, config=OutputFitConfig(steps=6, lr=0.1, lora_lr=3e-2))
    assert losses[-1] < losses[0]
    before, after = b.layout.unflatten(start), b.layout.unflatten(theta)
    assert all(not np.array_equal(before[n], after[n]) for n in fitted if n.endswith("lora_B"))
    assert all(np.array_equal(before[n], after[n]) for n in searched)


def test_int8_bundle_keeps_the_top_blocks_and_lord_drops_them(llama_lm_bundle, tmp_path):
    from edgeft.export.compress import compress_bundle, quantize_bundle
    from edgeft.runtime.output_fit import OutputFitConfig, fit_lm_output

    quantize_bundle(llama_lm_bundle, tmp_path / "int8")
    b8 = Bundle(tmp_path / "int8")
    assert b8.manifest.top_blocks is not None and (tmp_path / "int8" / "top_blocks.safetensors").is_file()
    enc = b8.encode(["the movie was great and the acting was good", "i hated this film it is boring"])
    _, losses, _ = fit_lm_output(b8, enc, b8.layout.initial(0), batch_size=2, config=OutputFitConfig(steps=5, lr=0.1))
    assert losses[-1] < losses[0]
    compress_bundle(llama_lm_bundle, tmp_path / "lord", params_ratio=0.7)
    lord = Bundle(tmp_path / "lord")
    assert lord.manifest.top_blocks is None and not (tmp_path / "lord" / "top_blocks.safetensors").exists()


def test_top_blocks_fit_on_a_bundle_cut_below_them_reads_the_cut(export_bundle_for, llama_folder):
    """--layers top:1: one fitted block, whose input is the cut's boundary (no whole graph opened), and
    the fit equals the whole graph's."""
    from edgeft.runtime.output_fit import OutputFitConfig, fit_lm_output

    cut = Bundle(export_bundle_for("llama-lm-top1", llama_folder, task="causal-lm", layers="top:1"))
    assert cut.chain is not None and cut.manifest.top_blocks.layers == [1]
    assert cut.chain.provides(["logits", cut.manifest.top_blocks.input])
    whole = Bundle(cut.folder, use_segments=False)
    enc = cut.encode(["the movie was great and the acting was good", "i hated this film it is boring"])
    config = OutputFitConfig(steps=4, lr=0.1)
    a, losses, _ = fit_lm_output(cut, enc, cut.layout.initial(0), 2, config=config)
    b, _, _ = fit_lm_output(whole, enc, whole.layout.initial(0), 2, config=config)
    assert cut._session is None and losses[-1] < losses[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_layers_chooses_the_fitted_blocks(export_bundle_for, llama_folder, tmp_path):
    from edgeft.export import ExportOptions, export_bundle

    one = Manifest.load(export_bundle_for("llama-lm-fit1", llama_folder, task="causal-lm", fit_layers=1))
    assert one.top_blocks.layers == [1] and one.top_blocks.input == "hidden.1"
    assert one.exact_fit_tensors() == {f"model.layers.1.mlp.{r}_proj.lora_{ab}" for r in ("gate", "up", "down") for ab in "AB"}
    none = Manifest.load(export_bundle_for("llama-lm-fit0", llama_folder, task="causal-lm", fit_layers=0))
    assert none.top_blocks is None and none.top_mlp is None and not none.exact_fit_tensors()
    for bad, options in ((3, {}), (2, {"layers": "top:1"}), (-1, {})):
        with pytest.raises(EdgeftError, match="--fit-layers"):
            export_bundle(str(llama_folder), tmp_path / f"bad{bad}", ExportOptions(task="causal-lm", fit_layers=bad, **options),
                          verify=False, log=lambda m: None)
        assert not (tmp_path / f"bad{bad}").exists()


def test_the_default_fits_the_top_80_percent_of_the_blocks():
    """The measured plateau (export/top_blocks.py): SmolLM2's 30 layers -> 24 fitted; a tiny model fits all."""
    from edgeft.export.top_blocks import default_fit_layers

    assert [default_fit_layers(n) for n in (1, 2, 16, 30)] == [1, 2, 13, 24]


def test_the_plan_counts_the_fit_weights_and_one_sequence_of_saved_activations(llama_lm_bundle, tmp_path):
    """runtime/plan.py reads the blocks' sizes from the weights file's header alone, at the planned length."""
    from edgeft.runtime.plan import _saved_activations_mb
    from edgeft.tensor_file import read_tensors, tensor_shapes

    b = Bundle(llama_lm_bundle)
    path = b.folder / b.manifest.top_blocks.weights
    assert tensor_shapes(path) == {k: list(v.shape) for k, v in read_tensors(path).items()}
    # what the fit's forward really keeps for one sequence of 16 tokens, and one block's recomputed attention
    fit = TopBlocksFit(b.folder, b.manifest)
    adapters = b.layout.unflatten(np.zeros(b.layout.size, dtype=np.float32))
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)  # tests/models.py tiny_llama: hidden 32
    kept = 0
    for layer in range(len(fit.layers)):
        x, saved = fit._block(x, layer, adapters, fit._rope(16))
        kept += sum(v.nbytes for v in saved.values())
    kept += sum(v.nbytes for v in fit._attention(saved["q"], saved["k"], saved["v"])[:2])
    assert _saved_activations_mb(b.folder, b.manifest, 16) == pytest.approx(kept / 2**20)
    want = kept / 2**20
    assert _saved_activations_mb(b.folder, b.manifest, 32) > 2 * want  # the attention weights grow with length squared
    folder = _copy(llama_lm_bundle, tmp_path)
    (folder / "top_blocks.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="safetensors"):
        tensor_shapes(folder / "top_blocks.safetensors")


def test_the_plan_of_a_standalone_fit_probes_the_fit_itself(below_bundle, lm_data, tmp_path):
    """edgeft plan (default recipe): the train prediction is the fit probe's line, within 15% of a budgeted run's peak;
    --search (a search on the whole graph follows) probes the search instead."""
    import subprocess
    import sys

    from edgeft.runtime.plan import plan_memory

    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "train", str(below_bundle), "--data", str(lm_data), "-o",
                             str(tmp_path / "run"), "--budget", "6fwd", "--batch-size", "4", "--eval-data", str(lm_data),
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    plan = plan_memory(below_bundle, None, 4)
    assert {p["path"] for p in plan.probes} == {"fit", "eval"}
    assert abs(plan.predicted_train_peak_rss_mb - measured) <= 0.15 * measured, (plan.predicted_train_peak_rss_mb, measured)
    assert {p["path"] for p in plan_memory(below_bundle, None, 4, search=True).probes} == {"train", "eval"}


def _assert_the_cut_gives_the_whole_graphs_input(alone, whole, fit):
    """The fit's x (from the cut below the blocks) is the whole graph's, at two shapes, random adapters."""
    for batch, length in ((2, 7), (3, 12)):
        rng = np.random.default_rng(length)
        feeds = _feeds(rng, batch, length)
        theta = (rng.standard_normal(alone.layout.size) * 0.2).astype(np.float32)
        want = whole.run(feeds, theta, [alone.manifest.top_blocks.input])[0]
        np.testing.assert_allclose(fit.entering(feeds, alone.layout.unflatten(theta)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantised_bundle_fits_from_its_own_graph_below_the_blocks(below_bundle, lm_data, tmp_path, bits, monkeypatch):
    """compress keeps the blocks' weights and cuts its own graph below them at the token ids (the fp32 cut and
    table would feed the fit other numbers than the device's graph): at two shapes that cut returns the
    compressed whole graph's hidden state; the default run opens only it and keeps what the whole graph scores."""
    from edgeft.adapters import load_adapter
    from edgeft.export.compress import quantize_bundle
    from edgeft.runtime import evaluate
    from edgeft.training import TrainRequest, run_training

    folder = tmp_path / bits
    quantize_bundle(below_bundle, folder, bits=bits)
    top = Manifest.load(folder).top_blocks
    assert top.below == "below_top_blocks.onnx" and top.embedding is None and top.standalone()
    assert top.below_input() == "input_ids"
    alone, whole = Bundle(folder, open_graph=False), Bundle(folder)
    fit = TopBlocksFit(alone.folder, alone.manifest, alone.below_session)
    assert fit.standalone and fit.embedding is None
    _assert_the_cut_gives_the_whole_graphs_input(alone, whole, fit)
    opened = record_opened_graphs(monkeypatch)
    summary = run_training(TrainRequest(folder, lm_data, tmp_path / "run", eval_data=lm_data, budget="8fwd",
                                        eval_every=4, progress=False), log=lambda m: None)
    assert opened == ["below_top_blocks.onnx"], opened
    assert summary["output_fit"]["train_loss_last"] < summary["output_fit"]["train_loss_first"]
    kept = load_adapter(tmp_path / "run" / "adapter", whole.layout, base=whole.layout.initial(0))
    eval_set = whole.encode([json.loads(r)["text"] for r in lm_data.read_text().splitlines()])
    # the fit's blocks hold the graph's own 4-bit weights (ONNX Runtime's rounding of this random model): the whole
    # graph scores the kept adapter as the fit measured it; int8's graph also rounds each activation, the fit not
    np.testing.assert_allclose(evaluate(whole, kept, eval_set, 32)["loss"], summary["best"]["loss"],
                               rtol=1e-4 if bits == "int4" else 0.01)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantised_bundle_with_a_tied_table_embeds_with_its_lm_head(export_bundle_for, llama_folder, tmp_path, bits):
    """A tied table is the LM head the fit holds (as the compressed graph holds it): the fit embeds with it and the
    cut below the blocks starts at hidden.0, without a table of its own; at two shapes it returns the compressed
    whole graph's hidden state."""
    import onnx

    from edgeft.export.compress import quantize_bundle

    source = export_bundle_for("llama-lm-tied-fit1", llama_folder, task="causal-lm", fit_layers=1)
    folder = tmp_path / bits
    quantize_bundle(source, folder, bits=bits)
    top = Manifest.load(folder).top_blocks
    assert top.embedding == "lm_head" and top.below_input() == "hidden.0" and top.below is not None
    alone, whole = Bundle(folder, open_graph=False), Bundle(folder)
    fit = TopBlocksFit(alone.folder, alone.manifest, alone.below_session)
    vocab, hidden = fit.weights["lm_head"].shape
    cut = onnx.load(folder / top.below)
    assert not [t.name for t in cut.graph.initializer if list(t.dims) == [vocab, hidden]]
    _assert_the_cut_gives_the_whole_graphs_input(alone, whole, fit)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantised_bundles_fit_holds_its_graphs_weights_as_codes(below_bundle, tmp_path, bits):
    """compress stores the fit's block matrices and LM head as 8-bit codes, or 4-bit ones two to a byte
    (edgeft/block_weights.py); the fit's int4 loss is the compressed graph's to float precision (the fp32
    originals were off by the rounding)."""
    from edgeft.block_weights import BlockWeight
    from edgeft.export.compress import quantize_bundle
    from edgeft.tensor_file import read_tensors

    folder = tmp_path / bits
    quantize_bundle(below_bundle, folder, bits=bits)
    fp32, stored = read_tensors(below_bundle / "top_blocks.safetensors"), read_tensors(folder / "top_blocks.safetensors")
    top = Manifest.load(folder).top_blocks
    suffix = ".codes" if bits == "int8" else ".nibbles"
    quantised = {n[: -len(suffix)] for n in stored if n.endswith(suffix)}
    roles = {"q", "k", "v", "o", "gate", "up"}  # the down projections stay fp32 in the graph, and so here
    assert quantised >= {f"{i}.{r}" for i in top.layers for r in roles}
    assert not any(f"{i}.down" in quantised for i in top.layers)
    nbytes = sum(v.nbytes for v in stored.values())
    assert nbytes < (0.5 if bits == "int8" else 0.35) * sum(v.nbytes for v in fp32.values())
    from edgeft.runtime.plan import _saved_activations_mb

    # the planner reads the blocks' sizes from the file's header, codes or not
    assert _saved_activations_mb(folder, Manifest.load(folder), 16) == _saved_activations_mb(below_bundle, Manifest.load(below_bundle), 16) > 0
    fit = TopBlocksFit(folder, Manifest.load(folder), Bundle(folder, open_graph=False).below_session)
    q = fit.weights[f"{top.layers[0]}.q"]
    assert isinstance(q, BlockWeight)
    original = fp32[f"{top.layers[0]}.q"]
    step = np.abs(original).max(1, keepdims=True) / (64 if bits == "int8" else 8)
    assert 0 < np.abs(q.dense() - original).max() and (np.abs(q.dense() - original) <= step).all()
    whole = Bundle(folder)
    rng = np.random.default_rng(5)
    feeds = _feeds(rng, 3, 12)
    theta = (rng.standard_normal(whole.layout.size) * 0.2).astype(np.float32)
    named = whole.layout.unflatten(theta)
    nll, _ = fit.score(feeds, fit.entering(feeds, named), named)
    loss, count = whole.run(feeds, theta, ["loss", "token_count"])
    np.testing.assert_allclose(nll, float((loss.astype(np.float64) * count).sum()), rtol=1e-4 if bits == "int4" else 0.01)
