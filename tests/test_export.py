"""Every export is checked against torch at a second input shape (batch 3, sequence 11)."""

import json

import numpy as np
import pytest

from edgeft.manifest import Manifest

TOLERANCE = 1e-4

CASES = [
    ("bert-cls", "bert_folder", dict(task="classification", labels=["neg", "pos"], pooling="mean")),
    ("bert-cls-pooler", "bert_folder", dict(task="classification", labels=["a", "b", "c"])),
    ("bert-prompt", "bert_mlm_folder", dict(task="prompt", labels=["neg", "pos"], template="{text} it was {mask}",
                                            verbalizer={"neg": "bad", "pos": "good"})),
    ("llama-cls", "llama_folder", dict(task="classification", labels=["neg", "pos"])),
    ("llama-prompt", "llama_folder", dict(task="prompt", labels=["neg", "pos"], template="{text} it was",
                                          verbalizer={"neg": "bad", "pos": "good"})),
    ("llama-lm", "llama_folder", dict(task="causal-lm")),
    ("gpt2-lm", "gpt2_folder", dict(task="causal-lm")),
]


@pytest.mark.parametrize("name,folder,options", CASES, ids=[c[0] for c in CASES])
def test_export_matches_torch_at_second_shape(request, export_bundle_for, name, folder, options):
    bundle = export_bundle_for(name, request.getfixturevalue(folder), **options)
    report = json.loads((bundle / "verify.json").read_text())
    manifest = Manifest.load(bundle)
    assert set(report) == set(manifest.graph_outputs) and len(manifest.hidden_states) == 2  # 2 layers
    for output, diff in report.items():
        assert diff < TOLERANCE, f"{name}: {output} differs from torch by {diff}"


def test_adapters_are_graph_inputs_and_change_the_output(bert_bundle):
    from edgeft.runtime import Bundle

    b = Bundle(bert_bundle)
    enc = b.encode(["the movie was great", "the plot was dull and bad"], np.array([1, 0]))
    feeds = b.feeds(enc, np.arange(2))
    theta = b.layout.initial(0)
    theta[b.layout.slice_of("head.weight")] = 0.3
    base = b.run(feeds, theta, ["logits"])[0]
    moved = theta.copy()
    moved[b.layout.slice_of(b.layout.names()[1])] = 0.1  # a lora_B: B = 0 is the identity
    assert b.layout.tensors[1].role == "lora_B"
    assert not np.allclose(base, b.run(feeds, moved, ["logits"])[0])


def test_padding_is_ignored_by_the_loss(bert_bundle, llama_lm_bundle):
    from edgeft.runtime import Bundle

    for folder in (bert_bundle, llama_lm_bundle):
        b = Bundle(folder)
        enc = b.encode(["the movie was great", "the film was terrible and the plot was dull and boring"], np.array([1, 0]))
        theta = b.layout.initial(0)
        alone = b.run(b.feeds(enc, np.array([0])), theta)[0]
        padded = b.run(b.feeds(enc, np.array([0, 1])), theta)[0][:1]
        np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_masked_prompt_reads_the_mask_position(request, export_bundle_for):
    from edgeft.runtime import Bundle

    options = dict(CASES[2][2])
    b = Bundle(export_bundle_for("bert-prompt", request.getfixturevalue("bert_mlm_folder"), **options))
    mask_id = b.tokenizer.token_to_id("[MASK]")
    ids = b.encode(["the movie was great " * 20], np.array([1])).ids[0]
    assert len(ids) == b.max_length and ids[-2] == mask_id  # left truncation keeps the prompt's end


def test_prompt_template_must_fit_the_model(bert_mlm_folder, llama_folder, tmp_path):
    from edgeft.errors import EdgeftError
    from edgeft.export import ExportOptions, export_bundle

    common = dict(task="prompt", labels=["neg", "pos"], verbalizer={"neg": "bad", "pos": "good"})
    with pytest.raises(EdgeftError, match="needs {mask}"):
        export_bundle(str(bert_mlm_folder), tmp_path / "a", ExportOptions(template="{text} it was", **common))
    with pytest.raises(EdgeftError, match="has no {mask}"):
        export_bundle(str(llama_folder), tmp_path / "b", ExportOptions(template="{text} it was {mask}", **common))


def test_gpt2_fused_qkv_has_adapters(gpt2_folder, export_bundle_for):
    manifest = Manifest.load(export_bundle_for("gpt2-lm", gpt2_folder, task="causal-lm"))
    assert manifest.adapter.targets == ["c_attn"]
    a = [t for t in manifest.adapter.tensors if t.role == "lora_A"]
    assert len(a) == 2 and a[0].shape == [8, 32]
    assert [t.shape for t in manifest.adapter.tensors if t.role == "lora_B"][0] == [96, 8]


def test_export_keeps_the_template_with_the_best_zero_shot_score(llama_folder, sentiment_data, tmp_path):
    """Several --template with --template-data: each is scored untrained on the data and the best (accuracy,
    then loss) is written to the manifest; the score printed for it is what `edgeft eval` then measures."""
    import ast
    import re

    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle
    from edgeft.runtime.evaluate import evaluate

    templates = ["{text} it was", "Review: {text}\nIn one word, it was", "{text}!! so"]
    args = ["export", str(llama_folder), "-o", str(tmp_path / "b"), "--task", "prompt", "--labels", "neg,pos",
            "--verbalizer", "neg=bad,pos=good", "--template-data", str(sentiment_data), "--no-verify"]
    result = CliRunner().invoke(main, args + [a for t in templates for a in ("--template", t)])
    assert result.exit_code == 0, result.output
    printed = {}
    for line in result.output.splitlines():
        found = re.match(r"template (['\"].*['\"]): zero-shot accuracy ([\d.]+), loss ([\d.]+)", line)
        if found:
            printed[ast.literal_eval(found[1])] = (float(found[2]), float(found[3]))
    assert sorted(printed) == sorted(templates)
    chosen = Manifest.load(tmp_path / "b").template
    assert printed[chosen] == min(printed.values(), key=lambda s: (-s[0], s[1]))
    b = Bundle(tmp_path / "b")
    data = load_dataset(sentiment_data, b.labels)
    measured = evaluate(b, b.layout.initial(0), b.encode(data.texts, data.labels), 16)
    assert abs(measured["accuracy"] - printed[chosen][0]) < 1e-3 and abs(measured["loss"] - printed[chosen][1]) < 1e-4


def test_template_choice_needs_data_and_good_labels(llama_folder, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "maybe"}\n')
    base = ["export", str(llama_folder), "--task", "prompt", "--labels", "neg,pos", "--verbalizer", "neg=bad,pos=good",
            "--template", "{text} it was", "--template", "{text} so"]
    for extra, message in (([], "--template-data"), (["--template-data", str(bad)], "maybe")):
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(main, base + ["-o", str(out)] + extra)
        assert result.exit_code != 0 and message in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()


def test_a_bundle_gets_the_umask_modes_not_the_temp_folder_owner_only_ones(tmp_path):
    """mkdtemp's 0700 folder and safetensors' 0600 files must not leak into the bundle (a copy to a device or
    another user would not read it)."""
    import os

    from safetensors.numpy import save_file

    from edgeft.export.bundle import write_bundle

    def write(folder):
        (folder / "model.onnx").write_bytes(b"graph")
        save_file({"w": np.zeros(2, np.float32)}, str(folder / "top_blocks.safetensors"))
        return {}

    old = os.umask(0o022)
    try:
        write_bundle(tmp_path / "bundle", write)
    finally:
        os.umask(old)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "bundle").iterdir()} == {
        "model.onnx": 0o644, "top_blocks.safetensors": 0o644}
