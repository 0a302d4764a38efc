"""Bundles from an existing ONNX file (optimum-style export) by graph surgery."""

import json
import shutil

import numpy as np
import pytest
import torch

from edgeft.errors import EdgeftError
from edgeft.export import ExportOptions, export_bundle


@pytest.fixture(scope="module")
def onnx_source(bert_folder, tmp_path_factory):
    """What `optimum-cli export onnx --task feature-extraction` writes: model.onnx with scoped node
    names, tokenizer.json and config.json in one folder (made here with the TorchScript exporter)."""
    from transformers import BertModel

    class Encoder(BertModel):  # a subclass keeps the node scopes of BertModel itself (/encoder/layer.0/...)
        def forward(self, input_ids, attention_mask, token_type_ids):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    folder = tmp_path_factory.mktemp("optimum")
    model = Encoder.from_pretrained(bert_folder, attn_implementation="eager").eval()
    ids = torch.randint(5, 50, (2, 9))
    with torch.no_grad():
        torch.onnx.export(
            model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(folder / "model.onnx"), dynamo=False,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
            opset_version=17,
        )
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(bert_folder / name, folder / name)
    return folder / "model.onnx"


def test_no_op_surgery_keeps_the_encoder(onnx_source, tmp_path):
    report = export_bundle(str(onnx_source), tmp_path / "b", ExportOptions(labels=["neg", "pos"], pooling="mean"))
    assert list(report.values())[0] < 1e-5, report


def test_surgery_matches_the_torch_export_with_adapters(onnx_source, bert_bundle, tmp_path):
    """Same model, same non-zero adapters, second input shape: ONNX-surgery bundle == torch-export bundle."""
    from edgeft.export.bundle import random_adapters, sample_batch
    from edgeft.manifest import Manifest
    from edgeft.runtime import Bundle

    out = tmp_path / "surgery"
    export_bundle(str(onnx_source), out, ExportOptions(labels=["neg", "pos"], pooling="mean", max_length=32))
    a, b = Bundle(out), Bundle(bert_bundle)
    assert sorted(a.layout.names()) == sorted(b.layout.names())
    assert {t.peft_key for t in a.layout.tensors} == {t.peft_key for t in b.layout.tensors}
    manifest = Manifest.load(out)
    adapters = random_adapters(manifest, seed=3)
    for batch, seq in ((2, 7), (3, 11)):
        feeds = sample_batch(manifest, 60, batch=batch, seq=seq, seed=batch)
        got = a.session.run(["loss", "logits", "pooled"], {**feeds, **adapters})
        want = b.session.run(["loss", "logits", "pooled"], {**feeds, **adapters})
        for g, w in zip(got, want):
            assert np.abs(g - w).max() < 1e-4


def test_onnx_source_problems_are_named(onnx_source, tmp_path):
    with pytest.raises(EdgeftError, match="no MatMul node named after targets"):
        export_bundle(str(onnx_source), tmp_path / "a", ExportOptions(labels=["x", "y"], targets=["nonexistent"]))
    with pytest.raises(EdgeftError, match="classification only"):
        export_bundle(str(onnx_source), tmp_path / "b", ExportOptions(task="causal-lm"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(EdgeftError, match="not a readable ONNX file"):
        export_bundle(str(bad), tmp_path / "c", ExportOptions(labels=["x", "y"]))
