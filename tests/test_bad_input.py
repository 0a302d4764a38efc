"""Bad input: one line naming the problem, exit code 2, no traceback, nothing saved is lost."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, fragment):
    assert code == 2, output
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("", "no examples"),
        ('{"text": "good"', "not valid JSON"),
        ('{"text": "good", "label": "meh"}\n', "unknown label 'meh'"),
        ('{"sentence": "good", "label": "pos"}\n', "no field 'text'"),
    ],
)
def test_bad_training_data(bert_bundle, tmp_path, content, fragment):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code, out = invoke("train", bert_bundle, "--data", data, "-o", tmp_path / "run", "--steps", "2")
    assert_one_line_error(code, out, fragment)
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(bert_bundle, sentiment_data, tmp_path):
    run = tmp_path / "run"
    code, _ = invoke("train", bert_bundle, "--data", sentiment_data, "-o", run, "--steps", "2", "--json")
    assert code == 0
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    code, out = invoke("train", bert_bundle, "--data", sentiment_data, "-o", run, "--steps", "2")
    assert_one_line_error(code, out, "already holds a run")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    # bad data with --overwrite still fails before anything is deleted
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "nope"}\n')
    code, out = invoke("train", bert_bundle, "--data", bad, "-o", run, "--steps", "2", "--overwrite")
    assert_one_line_error(code, out, "unknown label")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_corrupt_onnx(bert_bundle, sentiment_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bert_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph at all")
    code, out = invoke("eval", broken, "--data", sentiment_data)
    assert_one_line_error(code, out, "cannot load ONNX graph")


def test_foreign_onnx_does_not_match_manifest(bert_bundle, llama_lm_bundle, sentiment_data, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(bert_bundle, mixed)
    shutil.copy(llama_lm_bundle / "model.onnx", mixed / "model.onnx")
    code, out = invoke("eval", mixed, "--data", sentiment_data)
    assert_one_line_error(code, out, "manifest does not match the graph")


def test_malformed_manifest(bert_bundle, sentiment_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bert_bundle, broken)
    (broken / "edgeft.json").write_text("{ nope")
    code, out = invoke("eval", broken, "--data", sentiment_data)
    assert_one_line_error(code, out, "not valid JSON")
    code, out = invoke("info", tmp_path)
    assert_one_line_error(code, out, "not a bundle")


def test_adapter_that_does_not_fit(bert_bundle, sentiment_data, tmp_path):
    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    assert invoke("train", bert_bundle, "--data", sentiment_data, "-o", run, "--steps", "1", "--json")[0] == 0
    adapter = run / "adapter"
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = np.zeros((3, 3), dtype=np.float32)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", adapter)
    assert_one_line_error(code, out, "has shape [3, 3]")
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", adapter)
    assert_one_line_error(code, out, "not a readable safetensors file")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--adapter", adapter)
    assert_one_line_error(code, out, "rank 4 does not fit")


def test_unknown_device_and_impossible_budget(bert_bundle, sentiment_data, tmp_path):
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--device", "toaster")
    assert_one_line_error(code, out, "unknown device 'toaster'")
    profile = tmp_path / "tiny.toml"
    profile.write_text('name = "tiny"\nmemory_budget_mb = -1\n')
    code, out = invoke("eval", bert_bundle, "--data", sentiment_data, "--device", profile)
    assert_one_line_error(code, out, "memory_budget_mb must be positive")


def test_budget_overrun_is_reported(bert_bundle, sentiment_data, tmp_path):
    profile = tmp_path / "small.toml"
    profile.write_text('name = "small"\nmemory_budget_mb = 1\n')
    result = CliRunner().invoke(main, ["eval", str(bert_bundle), "--data", str(sentiment_data), "--device", str(profile)])
    assert result.exit_code == 0
    assert "exceeded the 1 MB budget of device 'small'" in result.output


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_bundle_is_refused(bert_bundle, sentiment_data, tmp_path, where):
    """A graph whose weights live in a side file outside its folder (../, an absolute path, a symlink out):
    the device (ONNX Runtime) and the workstation commands (onnx) both refuse it in one line."""
    import shutil

    import onnx
    from onnx import TensorProto

    bundle = tmp_path / "bundle"
    shutil.copytree(bert_bundle, bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    init = max(model.graph.initializer, key=lambda i: len(i.raw_data))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(init.raw_data)
    length = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[where]
    if where == "symlink":
        (bundle / "weights.bin").symlink_to(secret)
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    before = (bundle / "model.onnx").read_bytes()
    for args in (["eval", str(bundle), "--data", str(sentiment_data)],
                 ["compress", str(bundle), "-o", str(tmp_path / "small"), "--quantize", "int8"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "cannot load ONNX graph" in result.output, result.output
    assert (bundle / "model.onnx").read_bytes() == before and not (tmp_path / "small").exists()
