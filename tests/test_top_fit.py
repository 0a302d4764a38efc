"""The top MLP's exact-gradient fit (gated-MLP decoders other than Llama, here a tiny Mistral): numpy
gradients from ORT outputs against torch autograd, and the bundle's contract (manifest, weights file)."""

import json
import shutil

import numpy as np
import pytest

from edgeft.errors import EdgeftError
from edgeft.manifest import Manifest
from edgeft.runtime import Bundle
from edgeft.runtime.top_fit import TopMLPFit, rms_norm_backward, scored_softmax_chunks
from tests.models import torch_lm_reference


@pytest.mark.parametrize("batch, length", [(2, 7), (3, 11)])
def test_top_mlp_and_bias_gradients_equal_torch_autograd(mistral_lm_bundle, mistral_folder, batch, length):
    b = Bundle(mistral_lm_bundle)
    assert b.manifest.top_mlp is not None
    top = TopMLPFit(b.folder, b.manifest)
    rng = np.random.default_rng(batch)
    ids = rng.integers(5, 200, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, length // 2 + 1 :] = 0  # right padding, as Bundle.feeds pads
    feeds = {"input_ids": ids, "attention_mask": mask}
    # non-zero values everywhere (B ≠ 0, or dA would be trivially zero)
    theta = (rng.standard_normal(b.layout.size) * 0.2).astype(np.float32)
    named = b.layout.unflatten(theta)
    logits, *outputs = b.run(feeds, theta, ["logits", *top.outputs])
    got = {n: np.zeros(named[n].shape) for n in top.tensor_names()}
    got["bias"] = np.zeros(logits.shape[-1])
    nll = 0.0
    for rows, cols, g, summed in scored_softmax_chunks(logits, ids, mask):
        got["bias"] += g.sum(0)
        top.add(rows, cols, g, outputs, named, top.down_projection(named), got)
        nll += summed
    total, want = torch_lm_reference(mistral_folder, b.manifest, feeds, {k: np.array(v) for k, v in named.items()})
    np.testing.assert_allclose(nll, total, rtol=1e-4)
    np.testing.assert_allclose(got["bias"], want["output.bias"], rtol=1e-3, atol=1e-5)
    for name in top.tensor_names():
        scale = np.abs(want[name]).max()
        assert scale > 1e-6, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("rows, width", [(3, 5), (4, 16)])
def test_rms_norm_backward_equals_torch_autograd(rows, width):
    import torch

    rng = np.random.default_rng(width)
    r, w, up = rng.standard_normal((rows, width)), rng.standard_normal(width), rng.standard_normal((rows, width))
    x = torch.tensor(r, requires_grad=True)
    y = torch.tensor(w) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    (y * torch.tensor(up)).sum().backward()
    np.testing.assert_allclose(rms_norm_backward(up, r, w, 1e-5), x.grad.numpy(), rtol=1e-9, atol=1e-12)


def _copy(bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder)
    return folder


def test_top_mlp_weights_outside_the_bundle_are_refused(mistral_lm_bundle, tmp_path):
    folder = _copy(mistral_lm_bundle, tmp_path)
    raw = json.loads((folder / "edgeft.json").read_text())
    for bad in ("../top_mlp.safetensors", "/etc/passwd", ".hidden"):
        raw["top_mlp"]["weights"] = bad
        with pytest.raises(EdgeftError, match="inside the bundle"):
            Manifest.from_dict(raw)
    raw["top_mlp"]["weights"] = "top_mlp.safetensors"
    raw["top_mlp"]["modules"] = "gate"
    with pytest.raises(EdgeftError, match="malformed top_mlp"):
        Manifest.from_dict(raw)
    for bad in ("gate", ["gate"], {"modules": {}}):
        raw["top_mlp"] = bad
        with pytest.raises(EdgeftError, match="malformed"):
            Manifest.from_dict(raw)


def test_corrupt_top_mlp_weights_get_a_one_line_error(mistral_lm_bundle, tmp_path):
    folder = _copy(mistral_lm_bundle, tmp_path)
    (folder / "top_mlp.safetensors").write_bytes(b"not a safetensors file")
    b = Bundle(folder)
    with pytest.raises(EdgeftError, match="cannot read the top MLP's weights"):
        TopMLPFit(b.folder, b.manifest)


def test_int8_bundle_keeps_the_top_fit_and_lord_drops_it(mistral_lm_bundle, tmp_path):
    """int8 frozen weights: the fit's weights file comes along and the fit runs; LoRD replaces the down
    projection the gradient needs, so its bundle has no top_mlp and searches that LoRA like the body."""
    from edgeft.adapters import searched_tensors
    from edgeft.export.compress import compress_bundle, quantize_bundle
    from edgeft.runtime.output_fit import OutputFitConfig, fit_lm_output

    quantize_bundle(mistral_lm_bundle, tmp_path / "int8")
    b8 = Bundle(tmp_path / "int8")
    assert b8.manifest.top_mlp is not None and (tmp_path / "int8" / "top_mlp.safetensors").is_file()
    enc = b8.encode(["the movie was great and the acting was good", "i hated this film it is boring"])
    _, losses, _ = fit_lm_output(b8, enc, b8.layout.initial(0), batch_size=2, config=OutputFitConfig(steps=5, lr=0.1))
    assert losses[-1] < losses[0]
    compress_bundle(mistral_lm_bundle, tmp_path / "lord", params_ratio=0.7)
    lord = Bundle(tmp_path / "lord")
    assert lord.manifest.top_mlp is None and not (tmp_path / "lord" / "top_mlp.safetensors").exists()
    assert any(".mlp." in n for n in searched_tensors(lord.layout, lord.manifest))


def test_top_fit_runs_on_a_bundle_cut_below_its_top_layer(export_bundle_for, mistral_folder):
    """--layers top:1: the top segment returns the four outputs, and its gradients equal the whole graph's."""
    from edgeft.runtime.output_fit import OutputFitConfig, fit_lm_output

    cut = Bundle(export_bundle_for("mistral-lm-top1", mistral_folder, task="causal-lm", layers="top:1"))
    assert cut.chain is not None and cut.manifest.top_mlp is not None
    whole = Bundle(cut.folder, use_segments=False)
    enc = cut.encode(["the movie was great and the acting was good", "i hated this film it is boring"])
    config = OutputFitConfig(steps=4, lr=0.1)
    a, losses, _ = fit_lm_output(cut, enc, cut.layout.initial(0), 2, config=config)
    b, _, _ = fit_lm_output(whole, enc, whole.layout.initial(0), 2, config=config)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
