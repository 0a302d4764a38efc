"""edgeft plan: predicted peak memory against measured training peaks, the arithmetic of the plan, and
train stopping before any work when its batch cannot fit the device."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.runtime.plan import EVAL_BATCH, MAX_BATCH, plan_memory, predict


def _data(path, rows=64):
    from tests.models import SENTIMENT

    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in (SENTIMENT * 8)[:rows]))
    return path


def test_predicted_training_peak_within_15_percent_at_three_sizes(bert_bundle, tmp_path):
    data = _data(tmp_path / "d.jsonl")
    for batch in (2, 8, 32):
        run = tmp_path / f"run{batch}"
        result = subprocess.run([sys.executable, "-m", "edgeft.cli", "train", str(bert_bundle), "--data", str(data), "-o",
                                 str(run), "--steps", "3", "--batch-size", str(batch), "--eval-data", str(data),
                                 "--optimizer", "mezo", "--json"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-500:]
        measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        predicted = plan_memory(bert_bundle, None, batch).predicted_train_peak_rss_mb
        assert abs(predicted - measured) <= 0.15 * measured, (batch, predicted, measured)


def test_the_encoder_fit_is_planned(bert_bundle, tmp_path):
    """The default recipe on a BERT-family classifier (the encoder fit, numpy, chunks of 4 examples): its probe is in
    the plan, and the prediction is within 15% of the run's measured peak."""
    data = _data(tmp_path / "d.jsonl")
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", "train", str(bert_bundle), "--data", str(data), "-o",
                             str(tmp_path / "run"), "--budget", "4fwd", "--batch-size", "8", "--eval-data", str(data),
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["output_fit"]["steps"] == 4
    plan = plan_memory(bert_bundle, None, 8)
    assert [p["path"] for p in plan.probes].count("encoder-fit") == 1
    measured = summary["peak_rss_mb"]
    assert abs(plan.predicted_train_peak_rss_mb - measured) <= 0.15 * measured, (plan.predicted_train_peak_rss_mb, measured)
    assert plan_memory(bert_bundle, None, 8, output_fit=False).probes[0]["path"] != "encoder-fit"


def test_the_plan_arithmetic():
    # 500 MB of weights and runtime, 0.1 MB per training token, 0.05 per evaluated token, 20 MB unseen
    plan = predict((500.0, 0.1), (480.0, 0.05), 20.0, 1500.0, batch_size=8, length=128)
    assert plan.predicted_train_peak_rss_mb == pytest.approx(max(500 + 0.1 * 8 * 128, 480 + 0.05 * EVAL_BATCH * 128) + 20)
    assert plan.fits and plan.largest_batch_size == int((1500 - 20 - 500) / (0.1 * 128))
    tight = predict((500.0, 0.1), (480.0, 0.05), 20.0, 720.0, batch_size=32, length=128)
    assert not tight.fits and tight.largest_batch_size == int((720 - 20 - 500) / (0.1 * 128))
    # training's held-out evaluation (EVAL_BATCH rows) must fit too
    assert predict((500.0, 0.1), (480.0, 0.05), 20.0, 700.0, batch_size=1, length=128).largest_batch_size == 0
    hopeless = predict((500.0, 0.1), (480.0, 0.05), 20.0, 400.0, batch_size=1, length=128)
    assert not hopeless.fits and hopeless.largest_batch_size == 0
    assert predict((500.0, 0.1), (480.0, 0.05), 20.0, None, 8, 128).fits
    # a causal LM runs its batches one chunk of rows at a time: memory grows with the chunk, not the batch
    chunked = predict((500.0, 0.1), (480.0, 0.05), 20.0, 720.0, batch_size=32, length=128, rows_per_run=1)
    assert chunked.predicted_train_peak_rss_mb == pytest.approx(max(500 + 0.1 * 128, 480 + 0.05 * 128) + 20)
    assert chunked.fits and chunked.largest_batch_size == MAX_BATCH
    # the encoder fit's peak (fixed chunks) raises the prediction and, over the budget, leaves no batch that fits
    fitted = predict((500.0, 0.1), (480.0, 0.05), 20.0, 1500.0, batch_size=8, length=128, fit_peak=900.0)
    assert fitted.predicted_train_peak_rss_mb == pytest.approx(900 + 20) and fitted.fits
    over = predict((500.0, 0.1), (480.0, 0.05), 20.0, 800.0, batch_size=8, length=128, fit_peak=900.0)
    assert not over.fits and over.largest_batch_size == 0


def test_plan_command_and_train_stopping_before_work(bert_bundle, sentiment_data, tmp_path):
    roomy = tmp_path / "roomy.toml"
    roomy.write_text('name = "roomy"\nmemory_budget_mb = 100000\n')
    result = CliRunner().invoke(main, ["plan", str(bert_bundle), "--device", str(roomy), "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output.strip().splitlines()[-1])
    for key in ("predicted_train_peak_rss_mb", "predicted_eval_peak_rss_mb", "budget_mb", "fits"):
        assert key in plan
    assert plan["fits"] and plan["budget_mb"] == 100000 and plan["largest_batch_size"] >= 4
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(f'name = "tiny"\nmemory_budget_mb = {plan["predicted_train_peak_rss_mb"] / 4:.0f}\n')
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run),
                                       "--steps", "2", "--device", str(tiny)])
    assert result.exit_code == 2 and "even at batch 1" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not run.exists()
    result = CliRunner().invoke(main, ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run),
                                       "--steps", "2", "--device", str(roomy), "--batch-size", "auto", "--json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(tmp_path / "r2"),
                                       "--steps", "2", "--batch-size", "auto"])
    assert result.exit_code == 2 and "sets no memory_budget_mb" in result.output
