"""Graphs over protobuf's 2 GB limit keep their weights in ``model.onnx.data``. A billion-parameter export is
too slow for CI (docs/SCALE.md measures one), so these tests lower the threshold (``EDGEFT_EXTERNAL_DATA_BYTES``)
and take the same path with the tiny Llama: every command on a bundle with external data must write external
data where it writes a graph, and give what the same command gives on the inline bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from tests.models import CORPUS

DATA_FILE = "model.onnx.data"


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _json(*args) -> dict:
    return json.loads(_cli(*args, "--json").strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "lm.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return path


@pytest.fixture(scope="module")
def pair(llama_folder, tmp_path_factory):
    """The same tiny Llama exported twice: weights inline, and weights in external data."""
    from edgeft.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("pair")
    inline, external = root / "inline", root / "external"
    export_bundle(str(llama_folder), inline, ExportOptions(task="causal-lm", max_length=32), log=lambda m: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_EXTERNAL_DATA_BYTES", "0")
        export_bundle(str(llama_folder), external, ExportOptions(task="causal-lm", max_length=32), log=lambda m: None)
    return inline, external


def test_export_writes_external_data_and_runs_the_same(pair, lm_text):
    inline, external = pair
    assert not (inline / DATA_FILE).exists() and (external / DATA_FILE).stat().st_size > 10_000
    assert (external / "model.onnx").stat().st_size < (inline / "model.onnx").stat().st_size
    a, b = _json("eval", inline, "--data", lm_text), _json("eval", external, "--data", lm_text)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["tokens"] == b["tokens"]


def test_every_command_on_external_data_matches_the_inline_bundle(pair, lm_text, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFT_EXTERNAL_DATA_BYTES", "0")
    results = {}
    for name, bundle in zip(("inline", "external"), pair, strict=True):
        out = tmp_path / name
        run = out / "run"
        train = _json("train", bundle, "--data", lm_text, "-o", run, "--optimizer", "mezo", "--steps", 4,
                      "--batch-size", 4, "--seed", 3)
        made = {}
        for kind, extra in (("lord", ["--energy", 0.9, "--calibrate", lm_text]), ("int8", ["--quantize", "int8"]),
                            ("int4", ["--quantize", "int4"])):
            _cli("compress", bundle, "-o", out / kind, *extra)
            made[kind] = _json("eval", out / kind, "--data", lm_text, "--adapter", run / "adapter")["loss"]
        for kind, extra in (("merged", ["--merge"]), ("adapter", []), ("merged8", ["--merge", "--quantize", "int8"])):
            _cli("deploy", bundle, "--adapter", run / "adapter", "-o", out / kind, *extra)
        split = out / "split"  # split changes its bundle: a copy
        shutil.copytree(bundle, split)
        _cli("split", split, "--at", 1)
        made["split"] = _json("eval", split, "--data", lm_text, "--adapter", run / "adapter")["loss"]
        results[name] = (train, made, out)
    (train_a, made_a, out_a), (train_b, made_b, out_b) = results["inline"], results["external"]
    assert train_a["final_train_loss"] == pytest.approx(train_b["final_train_loss"], abs=1e-6)
    for kind in made_a:
        assert made_a[kind] == pytest.approx(made_b[kind], abs=1e-5), kind
    # derived graphs of the external bundle keep external data (a real 4 GB graph has no other way out)
    for kind in ("lord", "int8", "int4", "merged", "adapter", "merged8"):
        assert (out_b / kind / DATA_FILE).is_file(), kind
    assert all((out_b / "split" / "segments").glob("*.data"))
    from edgeft.export.deploy import run_deployed
    from edgeft.runtime import Bundle

    feeds = Bundle(pair[0]).feeds(Bundle(pair[0]).encode(CORPUS[:3]), np.arange(3))
    feeds = {k: v for k, v in feeds.items() if k in ("input_ids", "attention_mask")}
    for kind in ("merged", "adapter", "merged8"):
        (want,), (got,) = run_deployed(out_a / kind, feeds), run_deployed(out_b / kind, feeds)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_probe_sessions_go_through_a_file_above_the_limit(bert_bundle, sentiment_data, monkeypatch):
    """Over 2 GB a graph cannot be handed to ONNX Runtime as bytes: ``onnx_files.session`` writes it with
    external data instead. Forced here, the activation statistics LoRD calibrates on are the same."""
    from edgeft.data import load_dataset
    from edgeft.export import lord, onnx_files
    from edgeft.runtime import Bundle

    b = Bundle(bert_bundle)
    data = load_dataset(sentiment_data, b.labels)
    model = onnx_files.load_model(bert_bundle / "model.onnx")
    outputs = len(model.graph.output)
    want = lord.collect_covariances(b, model, b.encode(data.texts, data.labels))
    assert len(model.graph.output) == outputs  # the probe's extra outputs come off again
    monkeypatch.setattr(onnx_files, "fits_in_memory", lambda m: False)
    got = lord.collect_covariances(b, model, b.encode(data.texts, data.labels))
    assert sorted(got) == sorted(want) and len(model.graph.output) == outputs
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9)


def test_pruning_in_place_equals_the_pruned_copy(llama_lm_bundle):
    from edgeft.export import onnx_files
    from edgeft.export.merge import inference_only

    model = onnx_files.load_model(llama_lm_bundle / "model.onnx")
    copy = inference_only(model, ["logits"])
    assert len(model.graph.node) > len(copy.graph.node)  # the copy leaves its source alone
    pruned = inference_only(model, ["logits"], in_place=True)
    assert pruned is model
    assert pruned.SerializeToString() == copy.SerializeToString()


def test_saving_with_external_data_keeps_every_weight(llama_lm_bundle, tmp_path, monkeypatch):
    """edgeft writes the side file itself (onnx's writer counts the graph with ``ByteSize``, which encodes
    all of it: a 543 MB graph peaked at 3.3 GB). What it writes must load back to the same weights, at
    page-aligned offsets, and a second save over the first must not grow the side file."""
    from onnx import numpy_helper

    from edgeft.export import onnx_files

    want = {t.name: numpy_helper.to_array(t)
            for t in onnx_files.load_model(llama_lm_bundle / "model.onnx").graph.initializer}
    monkeypatch.setenv("EDGEFT_EXTERNAL_DATA_BYTES", "1000")
    for _ in range(2):
        onnx_files.save_model(onnx_files.load_model(llama_lm_bundle / "model.onnx"), tmp_path / "m.onnx")
        size = (tmp_path / "m.onnx.data").stat().st_size
    assert size < sum(a.nbytes for a in want.values()) + 4096 * len(want)
    structure = onnx_files.load_model(tmp_path / "m.onnx", weights=False)
    external = [t for t in structure.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0
                            for t in external)
    got = onnx_files.load_model(tmp_path / "m.onnx").graph.initializer
    assert sorted(t.name for t in got) == sorted(want)
    for t in got:
        np.testing.assert_array_equal(numpy_helper.to_array(t), want[t.name])


def test_the_size_estimate_follows_the_serialised_size(llama_lm_bundle, bert_bundle):
    """Whether a graph is saved with external data, or handed to ORT as bytes, is decided on an estimate
    that does not serialise it; it must stay close to protobuf's own count."""
    from edgeft.export import onnx_files

    for bundle in (llama_lm_bundle, bert_bundle):
        model = onnx_files.load_model(bundle / "model.onnx")
        exact = model.ByteSize()
        assert abs(onnx_files.approx_bytes(model) - exact) < 0.01 * exact
        assert onnx_files.approx_bytes(onnx_files.load_model(bundle / "model.onnx", weights=False)) <= exact
