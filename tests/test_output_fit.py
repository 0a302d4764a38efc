"""The causal-LM output bias: its exact gradient from forward outputs, the fit, and how a run saves,
reloads, searches around and merges it."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.runtime import Bundle
from edgeft.runtime.output_fit import OutputFitConfig, bias_gradient, fit_lm_output, output_bias_slice

LM_TEXTS = ["the movie was great and the acting was good", "the film was terrible and the plot was dull",
            "i loved this story it is very fun", "i hated this film it is boring", "the music in this scene was great",
            "the acting was good and the story was fun", "the plot was boring", "i loved the music"]


@pytest.mark.parametrize("batch, length, vocab", [(2, 5, 7), (3, 11, 50)])
def test_bias_gradient_equals_torch_autograd(batch, length, vocab):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(batch)
    logits = rng.standard_normal((batch, length, vocab)).astype(np.float32) * 3
    ids = rng.integers(0, vocab, size=(batch, length))
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1:, length // 2 + 1 :] = 0  # right padding, as Bundle.feeds pads
    bias = torch.zeros(vocab, dtype=torch.float64, requires_grad=True)
    z = torch.from_numpy(logits).double() + bias
    nll = F.cross_entropy(z[:, :-1].transpose(1, 2), torch.from_numpy(ids[:, 1:]), reduction="none")
    m = torch.from_numpy(mask[:, 1:]).double()
    total = (nll * m).sum()
    total.backward()
    gradient, summed, tokens = bias_gradient(logits.copy(), ids, mask)
    assert tokens == int(m.sum())
    np.testing.assert_allclose(summed, total.detach().item(), rtol=1e-5)
    np.testing.assert_allclose(gradient, bias.grad.numpy(), rtol=1e-4, atol=1e-5)


def _encoded(b):
    return b.encode(LM_TEXTS)


def test_fit_lowers_the_loss_and_touches_only_the_output_side(llama_lm_bundle):
    from edgeft.adapters import searched_tensors
    from edgeft.runtime import evaluate

    b = Bundle(llama_lm_bundle)
    enc = _encoded(b)
    theta = b.layout.initial(0)
    fitted, losses, _ = fit_lm_output(b, enc, theta, batch_size=4, config=OutputFitConfig(steps=20, lr=0.1))
    where = output_bias_slice(b)
    searched = searched_tensors(b.layout, b.manifest)
    assert len(searched) < len(b.layout.tensors) - 1  # the top MLP's six LoRA tensors are fitted, not searched
    for t in b.layout.tensors:
        part = b.layout.slice_of(t.name)
        if t.name in searched:
            assert fitted[part].tobytes() == theta[part].tobytes(), t.name
        elif t.role == "lora_B":  # starts at 0: the fit moved it
            assert np.abs(fitted[part]).max() > 0, t.name
    assert np.abs(fitted[where]).max() > 0
    assert evaluate(b, fitted, enc, 8)["loss"] < evaluate(b, theta, enc, 8)["loss"] - 0.05
    assert losses[-1] < losses[0]


def test_graph_loss_includes_the_bias(llama_lm_bundle):
    b = Bundle(llama_lm_bundle)
    enc = _encoded(b)
    feeds = b.feeds(enc, np.arange(4))
    theta = b.layout.initial(0)
    theta[output_bias_slice(b)] = np.random.default_rng(0).standard_normal(output_bias_slice(b).stop - output_bias_slice(b).start)
    loss, count, logits = b.run(feeds, theta, ["loss", "token_count", "logits"])
    _, summed, tokens = bias_gradient(logits, feeds["input_ids"], feeds["attention_mask"])
    assert tokens == count.sum()
    np.testing.assert_allclose(float((loss * count).sum()), summed, rtol=1e-4)


@pytest.fixture
def lm_data(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in LM_TEXTS))
    return path


def _train(bundle, data, run, *extra):
    args = ["train", str(bundle), "--data", str(data), "-o", str(run), "--json", "--batch-size", "4",
            "--eval-every", "5", "--eps", "1e-2", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_auto_fits_the_bias_then_searches_the_body_only(llama_lm_bundle, lm_data, tmp_path):
    from safetensors.numpy import load_file

    from edgeft.adapters import load_adapter

    summary = _train(llama_lm_bundle, lm_data, tmp_path / "run", "--steps", "6", "--output-fit-steps", "10")
    assert summary["optimizer"] == "mezo" and "output bias" in summary["recipe"]
    fit = summary["output_fit"]
    assert fit["steps"] == 10 and fit["train_loss_last"] < fit["train_loss_first"]
    assert summary["forward_passes"] == 10 + 6 * 2  # the fit's passes count in the run's
    saved = load_file(str(tmp_path / "run" / "adapter" / "output_adapter.safetensors"))["bias"]
    b = Bundle(llama_lm_bundle)
    assert np.abs(saved).max() > 0
    # the search moved the body but never the bias: the checkpoint's bias is the fitted one
    theta = load_file(str(tmp_path / "run" / "checkpoint" / "arrays.safetensors"))["optimizer.frozen.full"]
    np.testing.assert_array_equal(theta[output_bias_slice(b)], saved)
    # the saved adapter loads back with its bias and the top blocks' MLP LoRA, which the search never moved either
    vector = load_adapter(tmp_path / "run" / "adapter", b.layout)
    np.testing.assert_array_equal(vector[output_bias_slice(b)], saved)
    top = [n for n in b.layout.names() if ".mlp." in n]
    assert len(top) == 2 * 6 and set(top) == b.manifest.exact_fit_tensors()  # both tiny blocks: gate, up, down A and B
    for name in top:
        part = b.layout.slice_of(name)
        np.testing.assert_array_equal(theta[part], vector[part])
        if name.endswith("lora_B"):  # zero at the start: the fit moved it
            assert np.abs(vector[part]).max() > 0, name
    again = _train(llama_lm_bundle, lm_data, tmp_path / "run2", "--steps", "2", "--init-adapter", str(tmp_path / "run" / "adapter"))
    assert again["output_fit"] is None


def test_output_fit_is_kept_only_if_held_out_loss_falls(llama_lm_bundle, lm_data, tmp_path):
    summary = _train(llama_lm_bundle, lm_data, tmp_path / "run", "--steps", "2", "--output-fit-steps", "10",
                     "--eval-data", str(lm_data))
    fit = summary["output_fit"]
    assert fit["kept"] == (fit["eval_after"]["loss"] < fit["eval_before"]["loss"])
    assert summary["start"]["loss"] == pytest.approx(min(fit["eval_after"]["loss"], fit["eval_before"]["loss"]))


def test_fit_keeps_its_best_held_out_point(llama_lm_bundle):
    from edgeft.runtime import evaluate

    b = Bundle(llama_lm_bundle)
    enc = _encoded(b)
    held = b.encode(["the acting was great", "i hated the boring music"])
    theta = b.layout.initial(0)
    fitted, losses, info = fit_lm_output(b, enc, theta, batch_size=4, config=OutputFitConfig(steps=12, lr=0.3, lora_lr=0.1),
                                         held_out=held, eval_every=3)
    steps = [k for k, _ in info["evals"]]
    assert steps == [0, 3, 6, 9, 12] and len(losses) == 12
    best = min(info["evals"], key=lambda e: e[1]["loss"])
    assert info["best_step"] == best[0]
    np.testing.assert_allclose(evaluate(b, fitted, held, 32)["loss"], best[1]["loss"], rtol=1e-6)


def test_auto_spends_a_forward_pass_budget_on_the_output_fit(llama_lm_bundle, lm_data, tmp_path):
    summary = _train(llama_lm_bundle, lm_data, tmp_path / "run", "--budget", "12fwd", "--eval-data", str(lm_data))
    fit = summary["output_fit"]
    assert "top 2 blocks' MLPs" in summary["recipe"] and fit["steps"] == 12 and summary["forward_passes"] == 12
    assert summary["steps"] == 0 and summary["stopped_by"] == "budget"
    assert fit["best_step"] == min(fit["evals"], key=lambda e: e["loss"])["step"]


def test_a_causal_lm_run_without_eval_data_ranks_on_held_back_windows(llama_lm_bundle, tmp_path):
    from edgeft.runtime import evaluate
    from edgeft.training import _held_back_split

    words = " ".join(LM_TEXTS).split()
    data = tmp_path / "long.jsonl"  # 40 texts: enough windows to hold 4 back
    data.write_text("".join(json.dumps({"text": " ".join(words[i % 30 : i % 30 + 9])}) + "\n" for i in range(40)))
    for line in ("auto", "mezo"):
        summary = _train(llama_lm_bundle, data, tmp_path / line, "--budget", "6fwd", "--eval-every", "3", "--optimizer", line)
        assert summary["held_back_windows"] == 4
        if line == "auto":  # the fit stops on them
            assert [e["step"] for e in summary["output_fit"]["evals"]] == [0, 3, 6]
        # the trainer ranks on the same 4 windows, not on the whole text: its start is scored there
        b = Bundle(llama_lm_bundle)
        _, held = _held_back_split(b.encode([json.loads(r)["text"] for r in data.read_text().splitlines()]))
        rows = [json.loads(r) for r in (tmp_path / line / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
        assert rows[0]["eval"]["tokens"] == evaluate(b, b.layout.initial(0), held, 32)["tokens"]
    few = _train(llama_lm_bundle, _few(tmp_path), tmp_path / "run2", "--budget", "4fwd")
    assert few["held_back_windows"] == 0 and "evals" not in few["output_fit"]


def _few(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in LM_TEXTS))
    return path


def test_auto_output_fit_stops_at_a_time_budget(llama_lm_bundle, lm_data, tmp_path):
    summary = _train(llama_lm_bundle, lm_data, tmp_path / "run", "--budget", "2s")
    assert 1 <= summary["output_fit"]["steps"] < 10**6 and summary["stopped_by"] == "budget"
    assert summary["elapsed_s"] < 30


def test_no_output_fit_when_asked(llama_lm_bundle, lm_data, tmp_path):
    summary = _train(llama_lm_bundle, lm_data, tmp_path / "run", "--steps", "2", "--output-fit-steps", "0")
    assert summary["output_fit"] is None and summary["forward_passes"] == 4


def test_resume_after_output_fit_is_bit_identical(llama_lm_bundle, lm_data, tmp_path):
    from safetensors.numpy import load_file

    common = ("--output-fit-steps", "5", "--lr", "1e-2")
    _train(llama_lm_bundle, lm_data, tmp_path / "full", "--steps", "10", *common)
    _train(llama_lm_bundle, lm_data, tmp_path / "split", "--steps", "5", *common)
    _train(llama_lm_bundle, lm_data, tmp_path / "split", "--steps", "10", "--resume", *common)
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "arrays.safetensors"))["optimizer.frozen.full"] for r in ("full", "split"))
    assert a.tobytes() == b.tobytes()


# --- prompt mode: the label-word probe -------------------------------------------------------

@pytest.fixture(scope="module")
def llama_prompt_bundle(export_bundle_for, llama_folder):
    return export_bundle_for("llama-prompt", llama_folder, task="prompt", labels=["neg", "pos"],
                             template="{text} it was", verbalizer={"neg": "bad", "pos": "good"})


def test_probe_with_offset_fits_a_correction_to_fixed_logits():
    from edgeft.runtime.probe import fit_linear_probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    true = np.array([[2.0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0]])
    offset = rng.standard_normal((200, 2)) * 3  # strong fixed logits that ignore x
    y = ((x @ true.T + offset).argmax(1)).astype(np.int64)
    w, b = fit_linear_probe(x, y, 2, c=100.0, offset=offset)
    assert ((x @ w.T + b + offset).argmax(1) == y).mean() > 0.95
    assert ((offset).argmax(1) == y).mean() < 0.9  # the offset alone does not explain the labels
    # without the offset the same probe cannot explain the labels: the offset is used
    w0, b0 = fit_linear_probe(x, y, 2, c=100.0)
    assert ((x @ w0.T + b0).argmax(1) == y).mean() < 0.9


def test_label_probe_fits_on_the_answer_hidden_state(llama_prompt_bundle):
    from edgeft.runtime import evaluate
    from edgeft.runtime.output_fit import fit_label_probe
    from tests.models import SENTIMENT

    b = Bundle(llama_prompt_bundle)
    enc = b.encode([t for t, _ in SENTIMENT], np.array([b.labels.index(l) for _, l in SENTIMENT]))
    theta = b.layout.initial(0)
    fitted, record = fit_label_probe(b, enc, theta)
    assert record["train_loss_after"] < record["train_loss_before"]
    # the numpy loss of the fitted probe is the graph's loss with the fitted output adapter
    np.testing.assert_allclose(evaluate(b, fitted, enc, 32)["loss"], record["train_loss_after"], rtol=1e-4)
    moved = np.flatnonzero(fitted != theta)
    names = {t.name for t in b.layout.tensors if any(b.layout.slice_of(t.name).start <= i < b.layout.slice_of(t.name).stop for i in moved)}
    assert names <= {"output.weight", "output.bias"} and names


def test_prompt_training_keeps_the_probe_only_if_it_beats_zero_shot(llama_prompt_bundle, sentiment_data, tmp_path):
    from safetensors.numpy import load_file

    args = ["train", str(llama_prompt_bundle), "--data", str(sentiment_data), "--eval-data", str(sentiment_data),
            "-o", str(tmp_path / "run"), "--steps", "2", "--json", "--lr", "1e-3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    fit = summary["output_fit"]
    from edgeft.runtime.trainer import rank_key

    assert fit["kept"] == (rank_key("prompt", fit["eval_after"], True) > rank_key("prompt", fit["eval_before"], True))
    saved = load_file(str(tmp_path / "run" / "adapter" / "output_adapter.safetensors"))
    assert saved["weight"].shape == (2, 32) and saved["bias"].shape == (2,)
    assert (np.abs(saved["weight"]).max() > 0) == fit["kept"]


def test_cross_validated_probe_picks_strong_regularisation_when_features_are_noise():
    from edgeft.runtime.probe import fit_linear_probe_cv

    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 200)) * 40  # many large, uninformative features: C = 1 over-fits them
    offset = rng.standard_normal((32, 2))
    y = offset.argmax(1)  # the offset (zero-shot) already explains the labels
    w, b, c = fit_linear_probe_cv(x, y, 2, offset=offset)
    assert c <= 1e-2, c
    # and with an informative feature the chosen fit uses it
    y2 = (x[:, 0] > 0).astype(np.int64)
    w2, b2, c2 = fit_linear_probe_cv(x, y2, 2, offset=np.zeros((32, 2)))
    assert ((x @ w2.T + b2).argmax(1) == y2).mean() == 1.0
