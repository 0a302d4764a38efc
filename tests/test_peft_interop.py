"""Adapters round-trip with Hugging Face PEFT: edgeft → PEFT (logits match) and PEFT → edgeft (train further)."""

import numpy as np
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from edgeft.cli import main
from edgeft.runtime import Bundle, predict

TEXTS = ["the movie was great", "the plot was dull and the acting was bad", "i loved this story it is fun"]


def recipe_logits(model_folder, adapter_dir, texts, tokenizer_folder):
    """The torch-side recipe README documents: PEFT LoRA on AutoModel, mean pooling, head.safetensors."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(model_folder, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    head = load_file(str(adapter_dir / "head.safetensors"))
    return (pooled.numpy() @ head["weight"].T + head["bias"]).astype(np.float64)


def test_saved_adapter_loads_in_peft_and_matches_ort(bert_bundle, bert_folder, sentiment_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run), "--steps", "20",
            "--batch-size", "4", "--lr", "0.05", "--eps", "1e-2", "--json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    b = Bundle(bert_bundle)
    from edgeft.adapters import load_adapter

    vector = load_adapter(run / "adapter", b.layout)
    assert np.abs(vector[b.layout.adapter_mask()]).max() > 0
    enc = b.encode(TEXTS, np.zeros(3, dtype=np.int64))
    ort_logits = b.run(b.feeds(enc, np.arange(3)), vector, ["logits"])[0]
    torch_logits = recipe_logits(bert_folder, run / "adapter", TEXTS, bert_folder)
    assert np.abs(ort_logits - torch_logits).max() <= 1e-4


def test_peft_adapter_loads_into_bundle_and_trains_further(bert_bundle, bert_folder, sentiment_data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(1)
    base = AutoModel.from_pretrained(bert_folder, attn_implementation="eager")
    # alpha 8 (scale 1) on purpose: the bundle uses alpha 16, so B must be rescaled on load
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(peft_dir)
    peft_model.eval()

    b = Bundle(bert_bundle)
    from edgeft.adapters import load_adapter

    vector = load_adapter(peft_dir, b.layout)
    vector[b.layout.slice_of("head.weight")] = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    enc = b.encode(TEXTS, np.zeros(3, dtype=np.int64))
    pooled_ort = b.run(b.feeds(enc, np.arange(3)), vector, ["pooled"])[0]
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(bert_folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = peft_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled_torch = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert np.abs(pooled_ort - pooled_torch).max() <= 1e-4

    run = tmp_path / "run"
    args = ["train", str(bert_bundle), "--data", str(sentiment_data), "-o", str(run), "--steps", "3",
            "--batch-size", "4", "--init-adapter", str(peft_dir), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "adapter from" in result.output
    probs = predict(b, load_adapter(run / "adapter", b.layout), TEXTS)
    assert probs.shape == (3, 2)
