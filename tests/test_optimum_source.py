"""A real ``optimum-cli export onnx`` folder as the export source (issue 14 §5).

optimum-onnx 0.1.0 pins transformers < 4.58, which cannot share an environment with edgeft's transformers 5:
the test builds a virtual environment beside this one (system site packages, so torch 2.13 is the one already
installed; torch is pinned so pip never fetches another), exports all-MiniLM-L6-v2 there with optimum-cli, and
runs edgeft export → train → eval on the result here. Marked slow: it installs from PyPI (about 20 s).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

OPTIMUM = ("optimum-onnx==0.1.0", "torch==2.13.0")


@pytest.fixture(scope="module")
def optimum_export(tmp_path_factory):
    from edgeft import assets

    # the venv's own packages must win: a PYTHONPATH left by an earlier test (Ray sets one) would put this
    # environment's transformers 5 ahead of the venv's 4.57
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = tmp_path_factory.mktemp("optimum")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, env=env)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *OPTIMUM], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr[-2000:]
    out = work / "minilm-onnx"
    result = subprocess.run([str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", str(assets.minilm_folder()),
                             "--task", "feature-extraction", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and (out / "model.onnx").is_file(), result.stderr[-2000:]
    return out


def test_optimum_export_becomes_a_bundle_that_trains_and_matches_torch(optimum_export, sentiment_data, tmp_path):
    import torch
    from click.testing import CliRunner
    from transformers import AutoModel, AutoTokenizer

    from edgeft.cli import main
    from edgeft.runtime import Bundle

    runner = CliRunner()
    result = runner.invoke(main, ["export", str(optimum_export / "model.onnx"), "-o", str(tmp_path / "b"), "--labels", "neg,pos",
                                   "--pooling", "mean-normalized"])  # MiniLM's own; optimum's folder does not record it
    assert result.exit_code == 0, result.output
    # the bundle's pooled features (LoRA at B = 0) are the torch model's, pooled as the manifest says
    b = Bundle(tmp_path / "b")
    texts = ["a quietly moving film", "the worst two hours of my year, and the popcorn was stale", "fine"]
    pooled = b.run(b.feeds(b.encode(texts, np.zeros(3, dtype=np.int64)), np.arange(3)), b.layout.initial(0), ["pooled"])[0]
    from edgeft import assets

    source = assets.minilm_folder()  # the torch model the ONNX file was exported from
    tok, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert b.manifest.pooling == "mean-normalized" and np.abs(pooled - want).max() < 1e-4
    # and it trains and evaluates like any bundle
    train = runner.invoke(main, ["train", str(tmp_path / "b"), "--data", str(sentiment_data), "-o", str(tmp_path / "run"),
                                 "--steps", "6", "--json"])
    assert train.exit_code == 0, train.output
    summary = json.loads(train.output.strip().splitlines()[-1])
    assert summary["forward_passes"] >= 12 and summary["best"]["loss"] <= summary["start"]["loss"]
    evaluated = runner.invoke(main, ["eval", str(tmp_path / "b"), "--adapter", str(tmp_path / "run" / "adapter"),
                                     "--data", str(sentiment_data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output.strip().splitlines()[-1])["accuracy"] >= 0.75  # 12 texts the probe was fitted on
