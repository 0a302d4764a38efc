"""End to end on the real model and data (all-MiniLM-L6-v2, Rotten Tomatoes), with small settings.

Marked slow: CI runs it with few steps; `edgeft demo` is the full-size version.
"""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_minilm_demo_end_to_end_small(tmp_path):
    from edgeft.demo import DEMOS, run_demo

    result = run_demo(tmp_path, DEMOS["minilm-rotten-tomatoes"], steps=8, test_size=200, log=lambda m: None)
    before, after, summary = result["before"], result["after"], result["summary"]
    # a linear probe on real sentence embeddings beats guessing on real reviews
    assert before["accuracy"] > 0.58, before
    # the saved adapter is the best one seen on the dev split, never worse there than the start
    assert summary["best"]["accuracy"] >= summary["start"]["accuracy"]
    assert after["examples"] == before["examples"] == 200
    assert summary["output_fit"]["steps"] == 40 and summary["forward_passes"] == 40 + 16  # the encoder fit, then 8 MeZO steps
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "bundle-minilm-rotten-tomatoes" / "edgeft.json").read_text())
    assert manifest["pooling"] == "mean-normalized"  # read from the sentence-transformers config


def test_real_bundle_matches_sentence_embeddings(tmp_path):
    """The ONNX bundle of the real model agrees with sentence-transformers-style torch embeddings."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from edgeft import assets
    from edgeft.export import ExportOptions, export_bundle
    from edgeft.runtime import Bundle

    folder = assets.minilm_folder()
    out = tmp_path / "b"
    report = export_bundle(str(folder), out, ExportOptions(task="classification", labels=["a", "b"]), log=lambda m: None)
    assert max(report.values()) < 1e-4
    texts = ["a quietly moving film", "the worst two hours of my year, and the popcorn was stale"]
    b = Bundle(out)
    enc = b.encode(texts, np.zeros(2, dtype=np.int64))
    pooled = b.run(b.feeds(enc, np.arange(2)), b.layout.initial(0), ["pooled"])[0]
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.abs(pooled - want).max() < 1e-4


def test_default_demo_end_to_end_small(tmp_path):
    """SmolLM2 from GGUF, prompt mode: export (checked against torch), zero-shot, the label-word probe and the
    top blocks' fit from the prompt loss's exact gradient for a budget of 3 passes."""
    from edgeft.demo import run_demo
    from edgeft.runtime.trainer import rank_key

    result = run_demo(tmp_path, steps=3, test_size=48, log=lambda m: None)
    before, after = result["before"], result["after"]
    assert before["examples"] == after["examples"] == 48
    # a 135M instruction-tuned model reads sentiment from a plain prompt better than a coin
    assert before["accuracy"] > 0.55, before
    summary = result["summary"]
    fit = summary["output_fit"]
    # the probe's pass over the 32 examples in 2 batches of 16, then 1 step of the fit; no search after it
    assert fit["kind"] == "label-word probe + LoRA on the top 24 blocks' MLPs", fit["kind"]
    assert fit["forward_passes"] == 3 and fit["steps"] == 1 and summary["forward_passes"] == 3 and summary["steps"] == 0
    # kept only where it beats the zero-shot prompt on the dev split that picks it
    assert fit["kept"] == (rank_key("prompt", fit["eval_after"], True) > rank_key("prompt", fit["eval_before"], True))
    assert summary["best"] == (fit["eval_after"] if fit["kept"] else fit["eval_before"])
