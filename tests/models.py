"""Tiny models built from a config (the hub is out of reach): BERT, Llama and GPT-2 with real tokenizers."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a movie film was great terrible good bad plot acting it is not very fun dull boring "
    "loved hated story actor scene music and of to in this that with for as on at by an be"
).split()
CORPUS = [
    "the movie was great and the acting was good",
    "the film was terrible and the plot was dull",
    "i loved this story it is very fun",
    "i hated this film it is boring",
    "the music in this scene was great",
] * 20


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok, len(vocab)


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok, tok.get_vocab_size()


def tiny_bert(folder: Path, masked_lm: bool = False, layers: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    tok, vocab = _wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = (BertForMaskedLM if masked_lm else BertModel)(config)
    model.save_pretrained(folder)
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    return Path(folder)


def tiny_llama(folder: Path, tied: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok, vocab = _bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    return Path(folder)


def tiny_mistral(folder: Path) -> Path:
    """A gated-MLP decoder other than Llama: its bundles keep the single top-MLP fit (export/top_mlp.py)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tok, vocab = _bpe_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    MistralForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    return Path(folder)


def torch_lm_reference(model_folder: Path, manifest, feeds: dict, values: dict):
    """Summed next-token NLL over real tokens and its autograd gradient for every adapter tensor, in
    torch, with the adapters injected as the exporter injects them."""
    import numpy as np
    import torch

    from export.adapters import inject_adapters
    from export.loading import load_source
    from export.tasks import CausalLM

    src = load_source(str(model_folder), "causal-lm", None)
    spec = manifest.adapter
    slots, tensors, _ = inject_adapters(src.model, spec.targets, spec.kind, spec.rank, spec.alpha)
    names = [t.name for t in manifest.adapter.tensors]
    wrapper = CausalLM(src.model, slots, names)
    adapters = [torch.tensor(np.asarray(values[n]), dtype=torch.float32, requires_grad=True) for n in names]
    loss, count, _, *_ = wrapper(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]), *adapters)
    total = (loss * count).sum()
    total.backward()
    return float(total.detach()), {n: a.grad.double().numpy() for n, a in zip(names, adapters)}


def torch_prompt_reference(model_folder: Path, manifest, feeds: dict, values: dict, label_tokens: list[int]):
    """A prompt bundle's summed cross-entropy over the batch and its autograd gradient for every adapter
    tensor, in torch, with the adapters injected as the exporter injects them (a causal LM's answer position)."""
    import numpy as np
    import torch

    from export.adapters import inject_adapters
    from export.loading import load_source
    from export.tasks import Prompt

    src = load_source(str(model_folder), "prompt", None)
    spec = manifest.adapter
    slots, _, _ = inject_adapters(src.model, spec.targets, spec.kind, spec.rank, spec.alpha)
    names = [t.name for t in manifest.adapter.tensors]
    wrapper = Prompt(src.model, slots, names, label_tokens, None)
    adapters = [torch.tensor(np.asarray(values[n]), dtype=torch.float32, requires_grad=True) for n in names]
    loss, *_ = wrapper(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "labels")), *adapters)
    total = loss.sum()
    total.backward()
    return float(total.detach()), {n: a.grad.double().numpy() for n, a in zip(names, adapters)}


def tiny_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok, vocab = _bpe_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    return Path(folder)


SENTIMENT = [
    ("the movie was great and the acting was good", "pos"),
    ("i loved this story it is very fun", "pos"),
    ("the music in this scene was great", "pos"),
    ("a good film with great music", "pos"),
    ("loved the actor and the story", "pos"),
    ("it is fun and good", "pos"),
    ("the film was terrible and the plot was dull", "neg"),
    ("i hated this film it is boring", "neg"),
    ("the plot was bad and dull", "neg"),
    ("a terrible movie with boring acting", "neg"),
    ("hated the story and the scene", "neg"),
    ("it is not good it is bad", "neg"),
]


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return path


def record_opened_graphs(monkeypatch) -> list[str]:
    """The file names of every ONNX Runtime session opened from now on in this test (which graphs a run reads)."""
    import onnxruntime as ort

    opened, real = [], ort.InferenceSession

    def recording(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return opened
