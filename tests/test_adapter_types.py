"""Adapter types (LoLDU, tensor-train, Bone, PiSSA-initialised LoRA): each bundle against an
independent reference at two shapes, starting at the base model, merged, saved, and trained."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeft.adapters import load_adapter, save_adapter
from edgeft.cli import main
from edgeft.errors import EdgeftError
from edgeft.export.bundle import sample_batch
from edgeft.export.deploy import deploy, run_deployed
from edgeft.runtime import Bundle, CandidateEvaluator, make_optimizer

KINDS = {"pissa": dict(adapter="lora", init="pissa"), "loldu": dict(adapter="loldu"),
         "tt": dict(adapter="tt", tt_cores=3), "bone": dict(adapter="bone")}
SHAPES = [(3, 11), (2, 19)]


@pytest.fixture(scope="module", params=sorted(KINDS))
def llama_kind(request, export_bundle_for, llama_folder):
    kind = request.param
    return kind, export_bundle_for(f"llama-{kind}", llama_folder, task="causal-lm", rank=4, **KINDS[kind])


def _random_values(b: Bundle, seed: int) -> np.ndarray:
    """A trained-looking adapter: the start moved in every value (so every path of the update counts)."""
    rng = np.random.default_rng(seed)
    return b.layout.initial(0) + (rng.standard_normal(b.layout.size) * 0.1).astype(np.float32)


def _reference_model(llama_folder, b: Bundle, vector: np.ndarray, tmp_path):
    """The original HF model with each adapted weight replaced by W + ΔW, ΔW from the paper's formula in
    numpy/torch (not the export's code): PEFT for the types PEFT has, the formulas for LoLDU and TT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_folder, attn_implementation="eager").eval()
    spec = b.manifest.adapter
    if spec.kind in ("lora", "bone"):  # PEFT reads the saved folder onto the original weights
        from peft import PeftModel

        save_adapter(tmp_path / "peft", b.layout, vector, str(llama_folder), "CAUSAL_LM")
        return PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    named = b.layout.unflatten(vector)
    for module in {t.module for t in b.layout.tensors if t.module}:
        layer = model.get_submodule(module)
        w = layer.weight.data.double()
        if spec.kind == "loldu":
            p, lower, upper = torch.linalg.lu(w)
            r, d = spec.rank, torch.diagonal(upper)
            left, right = p @ lower[:, :r] @ torch.diag(d[:r]), torch.diag(1 / d[:r]) @ upper[:r]
            z = torch.from_numpy(named[f"{module}.loldu_z"]).double()
            s = float(named[f"{module}.loldu_scale"][0])
            new = w - left @ right + s * left @ torch.diag(z) @ right
        else:  # TT-matrix of three cores, contracted in one einsum
            g = [torch.from_numpy(named[f"{module}.tt_core_{j}"]).double() for j in range(3)]
            full = torch.einsum("xabp,pcdq,qefy->acebdf", *g).reshape(w.shape)
            new = w + (spec.alpha / spec.rank) * full
        layer.weight.data = new.float()
    return model


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_bundle_matches_reference_at_two_shapes(llama_kind, llama_folder, tmp_path, batch, seq):
    _, folder = llama_kind
    b = Bundle(folder)
    vector = _random_values(b, seed=batch)
    feeds = sample_batch(b.manifest, 250, batch, seq, seed=seq)
    got = b.run(feeds, vector, ["logits"])[0]
    model = _reference_model(llama_folder, b, vector, tmp_path)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                     attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
    want = want + b.layout.unflatten(vector)["output.bias"]  # the output bias is edgeft's, not PEFT's
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(got - want)[real].max() < 1e-4
    base = b.run(feeds, b.layout.initial(0), ["logits"])[0]
    assert np.abs(got - base)[real].max() > 1e-3  # the adapter changed the output: the check has teeth


def test_every_type_starts_at_the_base_model(llama_kind, llama_folder):
    from transformers import AutoModelForCausalLM

    _, folder = llama_kind
    b = Bundle(folder)
    feeds = sample_batch(b.manifest, 250, 2, 13, seed=3)
    got = b.run(feeds, b.layout.initial(7), ["logits"])[0]
    model = AutoModelForCausalLM.from_pretrained(llama_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                     attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
    assert np.abs(got - want)[feeds["attention_mask"].astype(bool)].max() < 1e-4


def test_merge_folds_the_update_at_two_shapes(llama_kind, tmp_path):
    _, folder = llama_kind
    b = Bundle(folder)
    vector = _random_values(b, seed=11)
    save_adapter(tmp_path / "adapter", b.layout, vector, "tiny", None)
    deploy(folder, tmp_path / "adapter", tmp_path / "merged", merge=True)
    import onnx

    graph = onnx.load(str(tmp_path / "merged" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]  # no adapter left
    for batch, seq in SHAPES:
        feeds = sample_batch(b.manifest, 250, batch, seq, seed=batch)
        got = run_deployed(tmp_path / "merged", feeds)[0]
        want = b.run(feeds, vector, ["logits"])[0]
        assert np.abs(got - want)[feeds["attention_mask"].astype(bool)].max() < 1e-4


def test_saved_adapter_round_trips_and_other_types_are_refused(llama_kind, tmp_path, export_bundle_for, llama_folder):
    kind, folder = llama_kind
    b = Bundle(folder)
    vector = _random_values(b, seed=5)
    save_adapter(tmp_path / "a", b.layout, vector, "tiny", None)
    assert load_adapter(tmp_path / "a", b.layout).tobytes() == vector.tobytes()
    plain = Bundle(export_bundle_for("llama-lm", llama_folder, task="causal-lm"))  # LoRA r=8, zero init
    if kind == "pissa":  # saved converted (rank 2r on the original weights): a plain r=8 LoRA, same model
        feeds = sample_batch(b.manifest, 250, 2, 9, seed=0)
        same = plain.run(feeds, load_adapter(tmp_path / "a", plain.layout), ["logits"])[0]
        assert np.abs(same - b.run(feeds, vector, ["logits"])[0])[feeds["attention_mask"].astype(bool)].max() < 1e-4
    else:
        with pytest.raises(EdgeftError, match="peft_type"):
            load_adapter(tmp_path / "a", plain.layout)
    save_adapter(tmp_path / "plain", plain.layout, plain.layout.initial(0), "tiny", None)
    with pytest.raises(EdgeftError, match="peft_type|PiSSA"):
        load_adapter(tmp_path / "plain", b.layout)


def test_pissa_refuses_an_adapter_saved_from_other_start_values(export_bundle_for, llama_folder, tmp_path):
    b = Bundle(export_bundle_for("llama-pissa", llama_folder, task="causal-lm", rank=4, **KINDS["pissa"]))
    save_adapter(tmp_path / "a", b.layout, b.layout.initial(0), "tiny", None)
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key][-1] += 1.0  # the stored-start half no longer matches this bundle
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(EdgeftError, match="not saved from this PiSSA bundle"):
        load_adapter(tmp_path / "a", b.layout)


# The adapter-type rows of the optimizer table: a ZO and a population optimizer lower the
# causal-LM loss of a fixed batch through each adapter type alone, and are deterministic per seed.
OPTIMIZERS = {"mezo": dict(lr=None, eps=1e-3), "cma": dict(intrinsic_dim=32, popsize=8, sigma=1.0)}


def _fit(b: Bundle, name: str, seed: int, steps: int):
    enc = b.encode(["the movie was great and the acting was good", "i hated this film it is boring",
                    "the music in this scene was great", "the film was terrible and the plot was dull"])
    batch = b.feeds(enc, np.arange(len(enc)))
    opt = make_optimizer(name, b.layout.initial(seed), layout=b.layout, seed=seed, total_steps=steps, **OPTIMIZERS[name])
    evaluator = CandidateEvaluator(b)
    start = float(evaluator.losses(batch, [b.layout.initial(seed)])[0])
    for _ in range(steps):
        candidates = opt.ask()
        opt.tell(candidates, evaluator.losses(batch, candidates))
    return start, float(evaluator.losses(batch, [opt.theta])[0]), opt.theta


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_optimizers_train_every_adapter_type(llama_kind, optimizer):
    _, folder = llama_kind
    b = Bundle(folder)
    start, end, theta = _fit(b, optimizer, seed=0, steps=40)
    assert end < start - 0.01, (start, end)
    assert _fit(b, optimizer, seed=0, steps=5)[2].tobytes() == _fit(b, optimizer, seed=0, steps=5)[2].tobytes()


def test_cli_export_info_train_and_merge_a_bone_classifier(bert_folder, sentiment_data, tmp_path):
    bundle = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", str(bert_folder), "-o", str(bundle), "--labels", "neg,pos",
                                       "--adapter", "bone", "--rank", "4", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(bundle)])
    assert "adapter: bone r=4" in info.output and "512 adapter values" in info.output  # 4 modules x 32 x 4
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(bundle), "--data", str(sentiment_data), "-o", str(run),
                                       "--steps", "4", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["deploy", str(bundle), "--adapter", str(run / "adapter"), "-o",
                                       str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(main, ["export", str(bert_folder), "-o", str(tmp_path / "b2"), "--labels", "neg,pos",
                                    "--adapter", "bone", "--rank", "5"])
    assert bad.exit_code != 0 and "not divisible into 5x5 blocks" in bad.output
    assert not (tmp_path / "b2").exists()


def test_derived_bundles_keep_the_stored_start_values(export_bundle_for, llama_folder, tmp_path):
    from edgeft.export.compress import quantize_bundle

    source = export_bundle_for("llama-pissa", llama_folder, task="causal-lm", rank=4, **KINDS["pissa"])
    quantize_bundle(source, tmp_path / "int8")
    assert Bundle(tmp_path / "int8").layout.initial(0).tobytes() == Bundle(source).layout.initial(0).tobytes()


def test_missing_start_values_or_unknown_type_is_one_line_error(export_bundle_for, llama_folder, tmp_path):
    import json
    import shutil

    source = export_bundle_for("llama-pissa", llama_folder, task="causal-lm", rank=4, **KINDS["pissa"])
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "adapter_init.safetensors").write_bytes(b"not safetensors")
    result = CliRunner().invoke(main, ["info", str(broken)])
    assert result.exit_code == 2 and "adapter start values are missing or unreadable" in result.output
    manifest = json.loads((broken / "edgeft.json").read_text())
    manifest["adapter"]["kind"] = "dora"
    (broken / "edgeft.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["info", str(broken)])
    assert result.exit_code == 2 and "adapter type 'dora' is unknown" in result.output
