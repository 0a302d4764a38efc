"""Training on a tiny bundle: it learns, keeps the best, and resumes bit-identically."""

import json

import numpy as np
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, starting_adapter
from edgeft.runtime.optimizers import ZeroOrder


def _train(bundle, data, run_dir, *extra):
    args = ["train", str(bundle), "--data", str(data), "-o", str(run_dir), "--json", "--batch-size", "4",
            "--eval-every", "5", "--lr", "1e-2", "--eps", "1e-2", *extra]
    return CliRunner().invoke(main, args)


def _theta(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoint" / "arrays.safetensors"))["optimizer.theta"]


def test_mezo_lowers_training_loss_on_tiny_bundle(bert_bundle):
    from tests.models import SENTIMENT

    b = Bundle(bert_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta = b.layout.initial(0)  # a zero head: everything must be learned
    opt = MeZO(theta, MeZOConfig(lr=0.05, eps=1e-2, queries=4, total_steps=60, seed=0))
    trainer = Trainer(b, enc, opt, TrainConfig(steps=60, batch_size=12, eval_every=60))
    start = trainer.evaluate()["loss"]
    trainer.fit()
    assert trainer.evaluate()["loss"] < start - 0.05


def test_cli_train_writes_a_complete_run(bert_bundle, sentiment_data, tmp_path):
    run = tmp_path / "run"
    result = _train(bert_bundle, sentiment_data, run, "--steps", "10")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    # auto: the encoder fit's 40 steps (its default length without a budget) before MeZO's 10 steps of 2 passes
    assert summary["steps"] == 10 and summary["output_fit"]["steps"] == 40 and summary["forward_passes"] == 40 + 20
    assert summary["peak_rss_mb"] > 0 and summary["start"]["accuracy"] >= 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/head.safetensors",
                 "checkpoint/arrays.safetensors", "metrics.jsonl", "curve.png", "summary.json"):
        assert (run / name).is_file(), name
    # the kept adapter is never worse on the eval data than the start
    assert summary["best"]["accuracy"] >= summary["start"]["accuracy"]


def test_resume_continues_bit_identically(bert_bundle, sentiment_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert _train(bert_bundle, sentiment_data, full, "--steps", "12").exit_code == 0
    # a run stopped after 6 steps (its last checkpoint), then resumed with a larger budget
    assert _train(bert_bundle, sentiment_data, split, "--steps", "6").exit_code == 0
    result = _train(bert_bundle, sentiment_data, split, "--steps", "12", "--resume")
    assert result.exit_code == 0, result.output
    assert _theta(full).tobytes() == _theta(split).tobytes()
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))


def test_killed_run_resumes_bit_identically(bert_bundle, sentiment_data, tmp_path):
    """SIGKILL mid-run, --resume, and the final adapter equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["--data", str(sentiment_data), "--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2",
              "--eval-every", "1000", "--steps", "400", "--json"]
    assert CliRunner().invoke(main, ["train", str(bert_bundle), "-o", str(full), *common]).exit_code == 0
    cmd = [sys.executable, "-m", "edgeft.cli", "train", str(bert_bundle), "-o", str(killed), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert (killed / "checkpoint").exists() or (killed / "checkpoint.old").exists()
    result = CliRunner().invoke(main, ["train", str(bert_bundle), "-o", str(killed), *common, "--resume"])
    assert result.exit_code == 0, result.output
    assert _theta(full).tobytes() == _theta(killed).tobytes()


def test_nonfinite_loss_never_reaches_the_adapter(bert_bundle):
    from tests.models import SENTIMENT

    class Flaky(ZeroOrder):
        def tell(self, candidates, losses):
            losses = np.array(losses)
            if self.step % 3 == 1:
                losses[0] = np.inf
            return super().tell(candidates, losses)

    b = Bundle(bert_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta, _ = starting_adapter(b, enc)
    opt = Flaky(theta, MeZOConfig(lr=1e-2, eps=1e-2, total_steps=9), None, "mezo")
    trainer = Trainer(b, enc, opt, TrainConfig(steps=9, batch_size=4, eval_every=3))
    trainer.fit()
    skipped = [r for r in trainer.records if r.get("skipped")]
    assert len(skipped) == 3
    assert np.all(np.isfinite(trainer.best)) and opt.lr() < 1e-2


def test_divergence_rolls_back_to_the_best_adapter(bert_bundle):
    from tests.models import SENTIMENT

    b = Bundle(bert_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta, _ = starting_adapter(b, enc)
    opt = MeZO(theta, MeZOConfig(lr=200.0, eps=1e-2, total_steps=12))  # far too large: it must blow up
    trainer = Trainer(b, enc, opt, TrainConfig(steps=12, batch_size=4, eval_every=3))
    summary = trainer.fit()
    assert summary["rollbacks"], "no rollback although the lr is absurd"
    assert opt.lr_scale < 1.0
    assert summary["best"]["loss"] <= summary["start"]["loss"]


def test_causal_lm_evaluation_caps_its_logits_and_scores_the_same(llama_lm_bundle, monkeypatch):
    import importlib

    evaluation = importlib.import_module("edgeft.runtime.evaluate")  # the module (the package exports the function)
    b = Bundle(llama_lm_bundle)
    enc = b.encode(["the movie was great and the acting was good " * 3, "i hated this film", "it is fun and dull"])
    theta = b.layout.initial(0)
    whole = evaluation.evaluate(b, theta, enc, 32)
    vocab = next(o for o in b.session.get_outputs() if o.name == "logits").shape[-1]
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET_BYTES", b.max_length * vocab * 4)  # one row's logits
    assert evaluation.causal_lm_rows(b, 32) == 1
    rows = evaluation.evaluate(b, theta, enc, 32)
    assert rows["tokens"] == whole["tokens"] and abs(rows["loss"] - whole["loss"]) < 1e-6


def test_small_training_set_is_evaluated_whole_by_default(bert_bundle, sentiment_data, tmp_path):
    from tests.models import SENTIMENT

    args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(tmp_path / "run"), "--steps", "2", "--json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["batch_size"] == len(SENTIMENT)
    profile = tmp_path / "small.toml"
    profile.write_text('name = "small"\nbatch_size = 4\nwhole_set_max = 8\n')  # the set is larger: batches of 4
    args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(tmp_path / "run2"), "--steps", "2",
            "--json", "--device", str(profile)]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["batch_size"] == 4


def test_causal_lm_candidates_run_in_row_chunks_with_the_same_loss(llama_lm_bundle, monkeypatch):
    import importlib

    from edgeft.runtime import CandidateEvaluator

    evaluation = importlib.import_module("edgeft.runtime.evaluate")
    b = Bundle(llama_lm_bundle)
    enc = b.encode(["the movie was great and the acting was good " * 3, "i hated this film", "it is fun and dull"])
    feeds = b.feeds(enc, np.arange(len(enc)))
    rng = np.random.default_rng(0)
    candidates = [b.layout.initial(0) + (rng.standard_normal(b.layout.size) * 0.01).astype(np.float32) for _ in range(2)]
    whole = CandidateEvaluator(b).losses(feeds, candidates)
    vocab = b.output_shape("logits")[-1]
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET_BYTES", b.max_length * vocab * 4)  # one row per run
    chunked = CandidateEvaluator(b)
    np.testing.assert_allclose(chunked.losses(feeds, candidates), whole, rtol=1e-6)
    assert len(chunked._row_chunks(feeds)) == len(feeds["input_ids"]) > 1 and chunked.forward_passes == 2
