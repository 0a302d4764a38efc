"""Budgets in the user's units (--budget 90s / 4000fwd) and what a run keeps when accuracy ties."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.errors import EdgeftError
from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer
from edgeft.runtime.budget import Budget, parse_budget
from edgeft.runtime.trainer import rank_key


def _train(bundle, data, run_dir, *extra):
    # MeZO by name: a classification bundle's default (auto) spends a budget on its exact fit, not on steps
    # (tests/test_encoder_blocks.py); these tests are about the search's budget
    args = ["train", str(bundle), "--data", str(data), "-o", str(run_dir), "--json", "--batch-size", "4",
            "--eval-every", "5", "--lr", "1e-2", "--eps", "1e-2", "--optimizer", "mezo", *extra]
    return CliRunner().invoke(main, args)


def _summary(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.parametrize("text, budget", [("90s", Budget(seconds=90)), ("20m", Budget(seconds=1200)),
                                          ("1.5h", Budget(seconds=5400)), ("4000fwd", Budget(forward_passes=4000))])
def test_budgets_parse(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["0", "0fwd", "5x", "-3m", "2.5fwd", "m", ""])
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(EdgeftError) as err:
        parse_budget(text)
    assert "\n" not in str(err.value) and "--budget" in str(err.value)


@pytest.mark.parametrize("bad", ["0", "5x"])
def test_cli_refuses_bad_budget_before_touching_the_run(bert_bundle, sentiment_data, tmp_path, bad):
    run = tmp_path / "run"
    assert _train(bert_bundle, sentiment_data, run, "--steps", "4").exit_code == 0
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    result = _train(bert_bundle, sentiment_data, run, "--budget", bad, "--overwrite")
    assert result.exit_code != 0 and "--budget" in result.output and len(result.output.strip().splitlines()) == 1
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_forward_pass_budget_stops_at_the_budget_and_resume_extends_it(bert_bundle, sentiment_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    whole = _summary(_train(bert_bundle, sentiment_data, full, "--budget", "24fwd"))
    assert whole["forward_passes"] == 24 and whole["steps"] == 12 and whole["stopped_by"] == "budget"
    first = _summary(_train(bert_bundle, sentiment_data, split, "--budget", "10fwd"))
    assert first["forward_passes"] == 10 and first["stopped_by"] == "budget"
    resumed = _summary(_train(bert_bundle, sentiment_data, split, "--budget", "24fwd", "--resume"))
    assert resumed["forward_passes"] == 24 and resumed["steps"] == 12
    from safetensors.numpy import load_file

    theta = [load_file(str(r / "checkpoint" / "arrays.safetensors"))["optimizer.theta"] for r in (full, split)]
    assert theta[0].tobytes() == theta[1].tobytes()
    assert 0 <= whole["forward_passes_to_best"] <= 24 and whole["elapsed_s_to_best"] <= whole["elapsed_s"]


def test_time_budget_stops_the_run(bert_bundle, sentiment_data, tmp_path):
    summary = _summary(_train(bert_bundle, sentiment_data, tmp_path / "run", "--budget", "2s"))
    assert summary["stopped_by"] == "budget"
    # stops after the step that crossed the budget; one tiny step plus the final evaluation is well under 1 s
    assert 2.0 <= summary["elapsed_s"] < 4.0 and summary["steps"] > 0


def test_rank_key_breaks_accuracy_ties_by_loss():
    start, later = {"accuracy": 1.0, "loss": 0.392}, {"accuracy": 1.0, "loss": 0.340}
    assert rank_key("classification", later, held_out=True) > rank_key("classification", start, held_out=True)
    # on the training set itself, the loss alone ranks (accuracy there saturates)
    worse_acc = {"accuracy": 0.9, "loss": 0.30}
    assert rank_key("classification", worse_acc, held_out=False) > rank_key("classification", start, held_out=False)
    assert rank_key("classification", worse_acc, held_out=True) < rank_key("classification", start, held_out=True)


def test_without_eval_data_the_lower_training_loss_is_kept(bert_bundle):
    """The defect of issue 12: a probe start that classifies the k-shot set perfectly was always kept."""
    from edgeft.runtime import starting_adapter
    from tests.models import SENTIMENT

    b = Bundle(bert_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta, _ = starting_adapter(b, enc)
    opt = MeZO(theta, MeZOConfig(lr=5e-2, eps=1e-2, queries=2, total_steps=30, seed=0))
    trainer = Trainer(b, enc, opt, TrainConfig(steps=30, batch_size=len(enc), eval_every=5))
    summary = trainer.fit()
    losses = [r["eval"]["loss"] for r in trainer.records if "eval" in r]
    assert summary["best"]["loss"] == min(losses)
    assert min(losses) < losses[0], "training did not lower the whole-set loss: the test proves nothing"
    assert summary["best_step"] > 0 and trainer.best.tobytes() != theta.tobytes()


def test_a_budget_spent_by_the_output_fit_still_saves_a_resumable_run(llama_lm_bundle, tmp_path):
    run = tmp_path / "run"
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the movie was great and the acting was good"] * 6))
    args = ["train", str(llama_lm_bundle), "--data", str(data), "-o", str(run), "--json", "--batch-size", "2"]
    first = _summary(CliRunner().invoke(main, [*args, "--budget", "3fwd", "--output-fit-steps", "3"]))
    assert first["steps"] == 0 and first["forward_passes"] == 3 and (run / "checkpoint").is_dir()
    resumed = _summary(CliRunner().invoke(main, [*args, "--budget", "7fwd", "--output-fit-steps", "3", "--resume"]))
    assert resumed["steps"] == 2 and resumed["forward_passes"] == 7
