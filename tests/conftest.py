"""Shared fixtures: tiny models and their bundles, exported once per test session."""

from __future__ import annotations

import pytest

from tests.models import SENTIMENT, tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, write_jsonl


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("edgeft")


def _export(workdir, name, model_folder, **options):
    from edgeft.export import ExportOptions, export_bundle

    out = workdir / f"bundle-{name}"
    if not out.exists():
        report = export_bundle(str(model_folder), out, ExportOptions(max_length=32, **options), log=lambda m: None)
        (out / "verify.json").write_text(__import__("json").dumps(report))
    return out


@pytest.fixture(scope="session")
def bert_folder(workdir):
    return tiny_bert(workdir / "tiny-bert")


@pytest.fixture(scope="session")
def bert_mlm_folder(workdir):
    return tiny_bert(workdir / "tiny-bert-mlm", masked_lm=True)


@pytest.fixture(scope="session")
def llama_folder(workdir):
    return tiny_llama(workdir / "tiny-llama")


@pytest.fixture(scope="session")
def mistral_folder(workdir):
    return tiny_mistral(workdir / "tiny-mistral")


@pytest.fixture(scope="session")
def mistral_lm_bundle(workdir, mistral_folder):
    return _export(workdir, "mistral-lm", mistral_folder, task="causal-lm")


@pytest.fixture(scope="session")
def gpt2_folder(workdir):
    return tiny_gpt2(workdir / "tiny-gpt2")


@pytest.fixture(scope="session")
def bert_bundle(workdir, bert_folder):
    return _export(workdir, "bert-cls", bert_folder, task="classification", labels=["neg", "pos"], pooling="mean")


@pytest.fixture(scope="session")
def llama_lm_bundle(workdir, llama_folder):
    return _export(workdir, "llama-lm", llama_folder, task="causal-lm")


@pytest.fixture(scope="session")
def sentiment_data(workdir):
    return write_jsonl(workdir / "sentiment.jsonl", SENTIMENT)


@pytest.fixture(scope="session")
def export_bundle_for(workdir):
    return lambda name, folder, **options: _export(workdir, name, folder, **options)
