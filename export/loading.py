"""Load a source model into torch: a Hugging Face folder or hub id, or a GGUF file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft.errors import EdgeftError

# Which torch model class each task needs, and so which module names PEFT keys use.
_AUTO = {"classification": "AutoModel", "prompt": None, "causal-lm": "AutoModelForCausalLM"}


@dataclass
class Source:
    model: object  # torch.nn.Module, eval mode, fp32
    tokenizer: object  # transformers fast tokenizer
    name: str
    architecture: str  # config.model_type
    auto_class: str
    gguf_file: str | None
    sentence_pooling: str | None  # "mean" / "cls" / ... from a sentence-transformers config
    normalize: bool


def _quiet() -> None:
    """Export output is edgeft's own lines: no per-tensor progress bars or registry chatter."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def load_source(source: str, task: str, gguf_file: str | None = None) -> Source:
    import transformers

    _quiet()

    import torch

    # eager attention exports to plain ONNX ops that every runtime has; fp32 is what the device trains in
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    folder = Path(source)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        auto_class = _AUTO[task] or ("AutoModelForCausalLM" if _is_decoder(config) else "AutoModelForMaskedLM")
        loader = getattr(transformers, auto_class)
        model, info = loader.from_pretrained(source, output_loading_info=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EdgeftError(f"cannot load model {source!r}: {first}") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if task == "prompt" and missing:
        raise EdgeftError(
            f"{source}: has no trained language-model head ({len(missing)} weights missing, e.g. {missing[0]}); "
            "prompt mode needs one — use --task classification"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise EdgeftError(f"{source}: no fast tokenizer (tokenizer.json) available")
    pooling, normalize = _sentence_transformers_pooling(folder)
    model.eval()
    return Source(model, tokenizer, source, config.model_type, auto_class, gguf_file, pooling, normalize)


def _is_decoder(config) -> bool:
    return bool(getattr(config, "is_decoder", False)) or config.model_type in ("llama", "gpt2", "mistral", "qwen2", "phi3")


def _sentence_transformers_pooling(folder: Path) -> tuple[str | None, bool]:
    """Read the pooling a sentence-transformers model was trained with (modules.json)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None, False
    entries = json.loads(modules.read_text())
    pooling, normalize = None, False
    for entry in entries:
        kind = entry.get("type", "")
        if kind.endswith("Pooling"):
            cfg = json.loads((folder / entry.get("path", "") / "config.json").read_text())
            if cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_lasttoken"):
                pooling = "last-token"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize
