"""Per-layer hidden-state statistics: read from the bundle's extra outputs, equal to torch's, and
used by the population optimizers' projection (``--set projection=hidden``)."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.runtime import Bundle, layer_input_std
from edgeft.runtime.optimizers.population import projection
from edgeft.runtime.statistics import CLIP_PERCENTILE

TEXTS = ["the movie was great and the acting was good", "i hated this film", "the music in this scene was great",
         "the film was terrible and the plot was dull", "it is fun"]


def _torch_layer_inputs(b, enc, bert_folder):
    """torch's hidden states entering each layer for ``enc`` (one batch), and the non-padding mask."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(bert_folder, attn_implementation="eager").eval()
    feeds = b.feeds(enc, np.arange(len(enc)))
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                       output_hidden_states=True).hidden_states[:-1]
    return hidden, feeds["attention_mask"].astype(bool)


def test_layer_input_std_matches_torch(bert_bundle, bert_folder):
    b = Bundle(bert_bundle)
    enc = b.encode(TEXTS, np.zeros(len(TEXTS), dtype=np.int64))
    got = layer_input_std(b, enc, batch_size=2)  # batches pad differently: padding must not count
    hidden, mask = _torch_layer_inputs(b, enc, bert_folder)
    want = []
    for h in hidden:
        flat = h.numpy()[mask].ravel().astype(np.float64)
        bound = np.percentile(np.abs(flat), CLIP_PERCENTILE)
        want.append(np.std(np.clip(flat, -bound, bound)))
    assert len(got) == 2 and np.allclose(got, want, rtol=1e-4)


def test_hidden_projection_scales_each_layer_by_its_std_over_the_median():
    shapes, groups = [(4, 8), (8, 4), (4, 8), (3, 8)], [0, 0, 1, -1]  # two layers and a head
    plain = projection(shapes, 6, seed=3, groups=groups)
    scaled = projection(shapes, 6, seed=3, groups=groups, layer_std=[1.0, 3.0])  # median 2
    assert np.allclose(scaled[:64], plain[:64] * 0.5) and np.allclose(scaled[64:96], plain[64:96] * 1.5)
    assert np.array_equal(scaled[96:], plain[96:])  # outside the layers: shape scale only


def _train(bundle, data, run, *extra):
    args = ["train", str(bundle), "--data", str(data), "-o", str(run), "--json", "--batch-size", "4", "--eval-every", "4",
            "--optimizer", "cma", "--set", "projection=hidden", "--set", "popsize=6", "--set", "intrinsic_dim=8", *extra]
    return CliRunner().invoke(main, args)


def test_cma_with_hidden_projection_trains_and_resumes_bit_identically(bert_bundle, sentiment_data, tmp_path):
    from safetensors.numpy import load_file

    full, split = tmp_path / "full", tmp_path / "split"
    result = _train(bert_bundle, sentiment_data, full, "--steps", "6")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["forward_passes"] == 36
    # stopped on the evaluation grid (--eval-every 4): a run stopped between evaluations also scores its
    # last adapter, which the uninterrupted run never does, so its kept adapter may differ (its path does not)
    assert _train(bert_bundle, sentiment_data, split, "--steps", "4").exit_code == 0
    assert _train(bert_bundle, sentiment_data, split, "--steps", "6", "--resume").exit_code == 0
    arrays = [load_file(str(r / "checkpoint" / "arrays.safetensors")) for r in (full, split)]
    for key in ("optimizer.history", "best"):  # every generation's losses, and the adapter kept
        assert arrays[0][key].tobytes() == arrays[1][key].tobytes(), key
    state = [json.loads((r / "checkpoint" / "state.json").read_text()) for r in (full, split)]
    assert state[0]["optimizer_state"]["config"]["layer_std"] == state[1]["optimizer_state"]["config"]["layer_std"]


def test_layer_input_bases_are_the_top_principal_directions_of_torchs_hidden_states(bert_bundle, bert_folder):
    from edgeft.runtime.statistics import layer_input_bases

    b = Bundle(bert_bundle)
    enc = b.encode(TEXTS, np.zeros(len(TEXTS), dtype=np.int64))
    got = layer_input_bases(b, enc, k=4, batch_size=2)  # padding must not count
    hidden, mask = _torch_layer_inputs(b, enc, bert_folder)
    assert len(got) == len(hidden) == 2
    for (basis, values), h in zip(got, hidden):
        x = h.numpy()[mask].astype(np.float64)
        want_values, want_vectors = np.linalg.eigh(x.T @ x)
        order = np.argsort(want_values)[::-1][:4]
        assert basis.shape == (x.shape[1], 4) and np.allclose(basis.T @ basis, np.eye(4), atol=1e-5)
        assert np.allclose(values, want_values[order], rtol=1e-3)
        # the same directions up to sign (the eigenvalues here are distinct)
        assert np.allclose(np.abs(basis.T @ want_vectors[:, order]), np.eye(4), atol=1e-3)


def test_activation_directions_train_and_resume_bit_identically(bert_bundle, sentiment_data, tmp_path):
    from safetensors.numpy import load_file

    def train(run, steps, *extra):
        args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run), "--json", "--batch-size", "4",
                "--eval-every", "4", "--optimizer", "zo-activations", "--set", "rank=3", "--lr", "0.05", "--steps", steps, *extra]
        return CliRunner().invoke(main, args)

    full, split = tmp_path / "full", tmp_path / "split"
    result = train(full, "8")
    assert result.exit_code == 0, result.output
    assert train(split, "4").exit_code == 0 and train(split, "8", "--resume").exit_code == 0
    a, b = (load_file(str(r / "checkpoint" / "arrays.safetensors")) for r in (full, split))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    layout = Bundle(bert_bundle).layout
    named = layout.unflatten(a["optimizer.theta"])
    assert any(np.any(named[t.name] != 0) for t in layout.tensors if t.role == "lora_B")  # B left its zero start
