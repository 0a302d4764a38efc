"""Task wrappers: the torch forward that becomes the bundle graph, loss computed in-graph.

Every wrapper takes ``(input_ids, attention_mask[, labels], *adapter_tensors)`` and
returns a per-example ``loss`` first (padded positions never count), then the
outputs the runtime needs for evaluation and probing, then the hidden states entering
each layer (``hidden.<i>``: per-layer statistics scale the population optimizers' search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.manifest import AdapterTensor

from .adapters import AdapterSlots


class _Task(nn.Module):
    def __init__(self, model: nn.Module, slots: AdapterSlots, adapter_names: list[str]):
        super().__init__()
        self.model, self.slots, self.adapter_names = model, slots, adapter_names

    def _fill(self, adapters) -> None:
        self.slots.clear()
        self.slots.update(zip(self.adapter_names, adapters))


def pool(hidden, attention_mask, mode: str, model: nn.Module):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode in ("mean", "mean-normalized"):
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1) if mode == "mean-normalized" else pooled
    if mode == "cls":
        return hidden[:, 0]
    if mode == "cls-pooler":  # BERT's stock head input: tanh(dense(h_CLS))
        return model.pooler(hidden)
    if mode == "last-token":  # decoders with right padding: last real token
        last = attention_mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(mode)


class Classification(_Task):
    """pooling → linear head (whose weight and bias are adapter inputs) → cross-entropy."""

    def __init__(self, model, slots, adapter_names, pooling: str):
        super().__init__(model, slots, adapter_names)
        self.pooling = pooling

    def forward(self, input_ids, attention_mask, labels, *adapters):
        self._fill(adapters)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling, self.model)
        logits = pooled @ self.slots["head.weight"].transpose(0, 1) + self.slots["head.bias"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, logits, pooled, *out.hidden_states[:-1]


def head_tensors(num_labels: int, hidden: int) -> list[AdapterTensor]:
    return [
        AdapterTensor("head.weight", [num_labels, hidden], "probe", None, None, "head_weight"),
        AdapterTensor("head.bias", [num_labels], "probe", None, None, "head_bias"),
    ]


def label_head_tensors(num_labels: int, hidden: int) -> list[AdapterTensor]:
    """The prompt bundle's output adapter: logits of the label words + h·Wᵀ + b, h the hidden state at
    the answer position. Zero at the start (the zero-shot prompt); the device fits it as a linear
    probe on h with the zero-shot logits as the offset (``runtime/start.py``)."""
    return [AdapterTensor("output.weight", [num_labels, hidden], "zeros", None, None, "output_weight"),
            AdapterTensor("output.bias", [num_labels], "zeros", None, None, "output_bias")]


class Prompt(_Task):
    """Cloze over the LM head: cross-entropy over the label words' logits (+ the output adapter).

    Masked LMs read the position of the mask token; causal LMs the last real token
    (the word that comes next). Only that one position goes through the LM head; its hidden
    state is returned as ``pooled`` (what the output adapter's probe is fitted on).
    """

    def __init__(self, model, slots, adapter_names, label_token_ids: list[int], mask_token_id: int | None):
        super().__init__(model, slots, adapter_names)
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)
        self.mask_token_id = mask_token_id

    def forward(self, input_ids, attention_mask, labels, *adapters):
        self._fill(adapters)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.last_hidden_state
        if self.mask_token_id is not None:
            position = (input_ids == self.mask_token_id).long().argmax(1)
        else:
            position = attention_mask.sum(1).long() - 1
        h = hidden[torch.arange(hidden.shape[0]), position]
        head = self.model.cls if hasattr(self.model, "cls") else self.model.get_output_embeddings()
        logits = head(h).index_select(-1, self.label_token_ids)
        logits = logits + h @ self.slots["output.weight"].transpose(0, 1) + self.slots["output.bias"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, logits, h, *out.hidden_states[:-1]


OUTPUT_BIAS = "output.bias"


def output_bias_tensor(vocab_size: int) -> AdapterTensor:
    """An additive bias over the vocabulary on the LM head's logits: the causal-LM output adapter.

    Its exact loss gradient needs no backward graph (softmax − one-hot, from the logits one
    forward pass returns), so the device fits it in closed form before zeroth-order search
    tunes the body (``runtime/output_fit.py``)."""
    return AdapterTensor(OUTPUT_BIAS, [vocab_size], "zeros", None, None, "output_bias")


class CausalLM(_Task):
    """Mean next-token negative log-likelihood per example over real (unpadded) tokens.

    Returns ``(loss, token_count, logits)``: the loss first (what training asks for), then
    the scored-token count (perplexity weights), then the next-token logits [B, T, vocab]
    the loss is made of — what a merged inference model keeps (``edgeft deploy --merge``).
    The logits include the output bias (an adapter input, zero at the start).
    With ``capture`` (``export/top_mlp.py``), the top MLP's four tensors follow the logits: what the
    device's exact-gradient fit of the top MLP's LoRA reads.
    """

    def __init__(self, model, slots, adapter_names, capture=None):
        super().__init__(model, slots, adapter_names)
        self.capture = capture

    def forward(self, input_ids, attention_mask, *adapters):
        self._fill(adapters)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = out.logits + self.slots[OUTPUT_BIAS]
        # every position against the next token, the last one against token 0 and masked out: log-softmax along
        # the vocabulary (the last axis) read in place, where slicing off the last position and moving the
        # vocabulary to cross_entropy's class axis exported as a Slice, a Transpose and a LogSoftmax across a
        # non-last axis: copies of the largest tensor and 14% of SmolLM2's forward pass (docs/scale-notes.md)
        # (cross_entropy on [B·T, vocab] rows would also avoid them, but torch 2.13's exporter fails on it)
        targets = F.pad(input_ids[:, 1:], (0, 1))
        nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
        mask = F.pad(attention_mask[:, 1:], (0, 1)).to(nll.dtype)
        count = mask.sum(1)
        loss = (nll * mask).sum(1) / count.clamp(min=1.0)
        top = self.capture.outputs() if self.capture is not None else []
        return loss, count, logits, *top, *out.hidden_states[:-1]
