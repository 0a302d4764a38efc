"""The output adapter, fitted in closed form from forward outputs before the search.

Causal LM: the output bias and, where the bundle has it, a LoRA on the MLPs of the top blocks
(Llama, ``runtime/top_blocks.py``) or of the top layer (other gated-MLP decoders, ``runtime/top_fit.py``),
fitted with Adam from their exact gradient. Prompt mode: a linear probe on the answer
position's hidden state over the label words (``fit_label_probe``), and on a Llama bundle since session 21
then it and the top blocks' MLP LoRA from their exact gradient (``prompt_fit.py``). Either is kept only if it
improves held-out data when there is some (``fit_output_adapter``).

For logits = W·h + b, the mean next-token NLL's gradient with respect to the output bias b is
mean over scored positions of (softmax(logits) − one-hot(next token)): a function of the logits
one forward pass already returns, no backward graph; the top MLP's LoRA gradient follows from the
same quantity through the LM head and the final norm. The rest of the body is frozen meanwhile, so
the fit is the causal-LM counterpart of the classification linear probe: it starts the
zeroth-order search of the body close to the optimum of the output side.

Measured here with torch (research.md, SmolLM2-135M, three tragedies → Macbeth, 40 Adam steps
of batch 8, body frozen): the bias alone at lr 3e-2 lowered perplexity 52.03 → 47.53 (−8.7%),
as much as LoRA on the LM head (47.55); every zeroth-order optimizer at 160 passes: −1.4% at best.
Measured with this code (docs/LEARNING.md, 40 steps of batch 4, test perplexity on 8,750 Macbeth
tokens): the bias alone 55.76 → 52.06 (−6.6%, median of 3 seeds); 200 steps over-fit (−5.5%). With
the top MLP's LoRA (torch, same data, seed 0, ``export/top_mlp.py``): 44.30 (−20.6%); its lr 3e-3 is
that trial's; on the top six blocks' MLPs (``export/top_blocks.py``): 40.44. With this code on the top 24 of
30 blocks (the default, 80%) for 10 minutes of one core: 31.80 (docs/FIT-DEPTH.md, seed 0), and 29.64 with
the lr falling linearly to zero over the budget (``OutputFitConfig.decay``; docs/learning-notes.md, session 18).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.data import epoch_batch
from edgeft.errors import EdgeftError

from .bundle import Bundle, Encoded
from .evaluate import causal_lm_rows
from .optimizers.updates import Adam
from .top_blocks import TopBlocksFit
from .top_fit import TopMLPFit, scored_softmax_chunks


FIT_STREAM = 11  # the fit's batch order, its own stream beside the trainer's (edgeft.data.epoch_batch)


@dataclass(frozen=True)
class OutputFitConfig:
    steps: int = 40  # one forward pass (one batch) per step
    lr: float = 3e-2  # the bias's Adam lr (the zeroth-order optimizers' rule, fed the exact gradient)
    lora_lr: float = 3e-3  # the top MLP LoRA's
    # both lrs fall linearly to zero over the budget (its steps or its time, whichever runs out first): see
    # docs/learning-notes.md, session 18 — at a constant lr the fit kept lowering the held-back loss past the
    # point where the test play's perplexity rose
    decay: bool = True


def bias_gradient(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Σ over scored positions of (softmax − one-hot) [vocab], the summed NLL and the number of
    scored tokens. Position t predicts token t+1 where that token is real (the graph's loss mask)."""
    gradient, nll, tokens = np.zeros(logits.shape[-1], dtype=np.float64), 0.0, 0
    for rows, _, g, summed in scored_softmax_chunks(logits, input_ids, attention_mask):
        gradient += g.sum(0, dtype=np.float64)
        nll, tokens = nll + summed, tokens + len(rows)
    return gradient, nll, tokens


def exact_fit(bundle: Bundle) -> TopBlocksFit | TopMLPFit | None:
    """What differentiates the bundle's LoRA above the output bias: its top blocks (Llama exports), its
    top MLP (other gated-MLP architectures, older Llama bundles) or nothing (the bias alone)."""
    if bundle.manifest.top_blocks is not None:
        # where the whole graph is open already (a search follows), the fit reads its input from it
        return TopBlocksFit(bundle.folder, bundle.manifest, None if bundle.graph_open else bundle.below_session)
    if bundle.manifest.top_mlp is not None:
        return TopMLPFit(bundle.folder, bundle.manifest)
    return None


def fit_kind(manifest) -> str:
    if manifest.encoder_blocks is not None:
        return f"head + LoRA on the {len(manifest.encoder_blocks.layers)} encoder layers"
    top = manifest.top_blocks
    if top is not None:
        roles = "MLPs" if sorted(top.fitted) == ["down", "gate", "up"] else ", ".join(top.fitted)
        output = "label-word probe" if manifest.task == "prompt" else "output bias"
        return f"{output} + LoRA on the top {len(top.layers)} blocks' {roles}"
    return "output bias + top MLP LoRA" if manifest.top_mlp is not None else "output bias"


def output_bias_slice(bundle: Bundle) -> slice | None:
    """Where a causal LM's output bias lies in the adapter vector (None: no such bias)."""
    if bundle.task != "causal-lm":
        return None
    for t in bundle.layout.tensors:
        if t.role == "output_bias":
            return bundle.layout.slice_of(t.name)
    return None


def fit_lm_output(bundle: Bundle, train: Encoded, theta: np.ndarray, batch_size: int, seed: int = 0,
                  config: OutputFitConfig = OutputFitConfig(), held_out: Encoded | None = None, eval_every: int = 50,
                  time_share=lambda: 0.0, on_step=None) -> tuple[np.ndarray, list[float], dict]:
    """Adam on the output bias (and the top blocks' or top MLP's LoRA where the bundle has one) over ``config.steps``
    batches of ``train`` (fewer if ``time_share()``, the share of a time budget spent, reaches 1); the rest of
    ``theta`` is unchanged.

    With ``held_out`` data the fit is scored on it at the start, every ``eval_every`` steps and at the
    end, and the best-scoring vector is returned (early stopping: a long fit can over-fit the training
    text). Returns (vector, each step's training loss — mean NLL per token before that step's
    update —, {"best_step", "evals": [(step, held-out metrics)]}). The logits of a batch are computed
    in row chunks that stay within the evaluation's logits budget, so a 49k-token vocabulary does
    not multiply memory."""
    from .evaluate import evaluate

    where = output_bias_slice(bundle)
    if where is None:
        raise ValueError("this bundle has no output bias (exported before edgeft had one?)")
    top = exact_fit(bundle)
    blocks = top if isinstance(top, TopBlocksFit) else None
    standalone = blocks is not None and blocks.standalone  # never opens the whole graph
    theta = np.array(theta, dtype=np.float32, copy=True)
    named = bundle.layout.unflatten(theta)  # views: updating them updates theta
    groups = {"bias": (theta[where], config.lr)}
    for name in top.tensor_names() if top else []:
        groups[name] = (named[name], config.lora_lr)
    adam = Adam()
    states = {k: adam.init(v.size) for k, (v, _) in groups.items()}
    outputs = ([] if blocks else ["logits"]) + (top.outputs if top else [])
    # the whole graph's runs hold [rows, length, vocab] logits: in row chunks (a standalone fit's runs end below the blocks)
    rows_per_run = batch_size if standalone else causal_lm_rows(bundle, batch_size)
    n, losses, evals = len(train), [], []
    best = None  # (held-out loss, step, vector)

    def consider(step):
        nonlocal best
        metrics = held_out_score(bundle, blocks, named, held_out) if standalone else evaluate(bundle, theta, held_out, 32)
        evals.append((step, metrics))
        if best is None or metrics["loss"] < best[0]:
            best = (metrics["loss"], step, theta.copy())

    if held_out is not None:
        consider(0)
    for step in range(config.steps):
        share = time_share()
        if share >= 1.0:
            break
        scale = 1.0 - max(step / config.steps, share) if config.decay else 1.0
        batch = epoch_batch(n, batch_size, seed, FIT_STREAM, step)
        gradients = {k: np.zeros(v.shape, dtype=np.float64) for k, (v, _) in groups.items()}
        nll, tokens = 0.0, 0
        for start in range(0, len(batch), rows_per_run):
            feeds = bundle.feeds(train, batch[start : start + rows_per_run])
            if standalone:
                summed, count = blocks.accumulate(feeds, blocks.entering(feeds, named), named, gradients)
            elif blocks:
                (hidden,) = bundle.run(feeds, theta, outputs)
                summed, count = blocks.accumulate(feeds, hidden, named, gradients)
            else:
                logits, *top_outputs = bundle.run(feeds, theta, outputs)
                if top:
                    summed, count = top.accumulate(feeds, logits, top_outputs, named, gradients)
                else:
                    g, summed, count = bias_gradient(logits, feeds["input_ids"], feeds["attention_mask"])
                    gradients["bias"] += g
                del logits, top_outputs
            nll, tokens = nll + summed, tokens + count
        if tokens == 0:
            continue
        losses.append(nll / tokens)
        for key, (value, lr) in groups.items():
            step_size = adam.apply((gradients[key] / tokens).astype(np.float32).ravel(), states[key], lr * scale, len(losses) - 1)
            value -= step_size.reshape(value.shape)
        if on_step:
            on_step(len(losses), losses[-1])
        if held_out is not None and len(losses) % eval_every == 0:
            consider(len(losses))
    if held_out is None:
        return theta, losses, {"best_step": len(losses), "evals": evals}
    if not evals or evals[-1][0] != len(losses):
        consider(len(losses))
    return best[2], losses, {"best_step": best[1], "evals": evals}


HELD_OUT_ROWS = 8  # sequences per run of the graph below the blocks when scoring held-out text


def held_out_score(bundle: Bundle, blocks: TopBlocksFit, named: dict[str, np.ndarray], encoded: Encoded) -> dict[str, float]:
    """``evaluate``'s causal-LM metrics, computed by the standalone top-blocks fit (the graph below the
    blocks, then numpy) instead of the whole graph: the same loss, without a second copy of the weights."""
    from .evaluate import length_sorted_batches, lm_metrics

    nll, tokens = 0.0, 0
    for index in length_sorted_batches(encoded, HELD_OUT_ROWS):
        feeds = bundle.feeds(encoded, index)
        summed, count = blocks.score(feeds, blocks.entering(feeds, named), named)
        nll, tokens = nll + summed, tokens + count
    return lm_metrics(nll, tokens)


def fit_label_probe(bundle: Bundle, train: Encoded, theta: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """A prompt bundle's output adapter as a linear probe on the answer position's hidden state h:
    label logits = zero-shot logits + h·Wᵀ + b, (W, b) by L2-regularised logistic regression with the
    zero-shot logits as a fixed offset, so the regulariser pulls towards the zero-shot prompt rather
    than towards a uniform guess; its strength chosen by cross-validation on the training set
    (``fit_linear_probe_cv``). One forward pass over the training set."""
    from .evaluate import length_sorted_batches
    from .probe import fit_linear_probe_cv

    named = bundle.layout.unflatten(np.array(theta, dtype=np.float32, copy=True))
    theta = bundle.layout.flatten({**named, "output.weight": np.zeros_like(named["output.weight"]),
                                   "output.bias": np.zeros_like(named["output.bias"])})
    n, labels = len(train), len(bundle.labels)
    features, logits = None, np.empty((n, labels), dtype=np.float64)
    for index in length_sorted_batches(train, batch_size):
        z, h = bundle.run(bundle.feeds(train, index), theta, ["logits", "pooled"])
        if features is None:
            features = np.empty((n, h.shape[-1]), dtype=np.float32)
        features[index], logits[index] = h, z
    weight, bias, c = fit_linear_probe_cv(features, train.labels, labels, offset=logits)
    named = bundle.layout.unflatten(theta)
    named["output.weight"][...] = weight
    named["output.bias"][...] = bias

    def loss(z):
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(n), train.labels]))

    after = logits + features.astype(np.float64) @ weight.T.astype(np.float64) + bias
    return theta, {"examples": n, "c": c, "train_loss_before": loss(logits), "train_loss_after": loss(after),
                   "forward_passes": -(-n // batch_size)}


def label_probe_tensors(bundle: Bundle) -> bool:
    """Whether this is a prompt bundle with the label-word output adapter (older bundles lack it)."""
    return bundle.task == "prompt" and "output.weight" in bundle.layout.names()


def fit_output_adapter(bundle: Bundle, train: Encoded, held_out: Encoded | None, theta: np.ndarray, batch_size: int,
                       seed: int, steps: int, eval_every: int = 50, time_share=lambda: 0.0, on_step=None,
                       calibrate: bool = False) -> tuple[np.ndarray, dict | None, str]:
    """Fit the bundle's output adapter, if it has one; keep the fit only if it improves ``held_out``
    (ranked as the trainer ranks adapters), or always without held-out data (on the training data
    the fit cannot lose). A causal LM's fit keeps its best held-out point (``fit_lm_output``), so does the
    encoder fit, whose head ``calibrate`` scales to the held-out data (``fit_encoder``: the start is then
    returned calibrated even where it stays the best point). Returns (vector, record or None, words for
    the start's description)."""
    from .encoder_fit import EncoderFitConfig, fit_encoder  # these import this module's FIT_STREAM
    from .prompt_fit import PromptFitConfig, fit_prompt
    from .evaluate import evaluate
    from .trainer import rank_key

    if output_bias_slice(bundle) is not None:
        fitted, losses, info = fit_lm_output(bundle, train, theta, batch_size, seed, OutputFitConfig(steps=steps),
                                             held_out, eval_every, time_share, on_step)
        if not losses:
            raise EdgeftError("output fit: the training data has no window of two or more tokens")
        kind = fit_kind(bundle.manifest)
        record = {"kind": kind, "steps": len(losses), "forward_passes": len(losses), "best_step": info["best_step"],
                  "forward_passes_to_best": info["best_step"], "train_loss_first": losses[0], "train_loss_last": losses[-1], "kept": True}
        what = f" + {kind} fitted in {len(losses)} steps"
        if held_out is not None:
            (_, before), after = info["evals"][0], dict(info["evals"])[info["best_step"]]
            record.update(eval_before=before, eval_after=after, kept=info["best_step"] > 0,
                          evals=[{"step": k, "loss": m["loss"]} for k, m in info["evals"]])
            what += f" (held-out best at step {info['best_step']})" if record["kept"] else ""
    elif bundle.manifest.encoder_blocks is not None and bundle.task == "classification":
        fitted, losses, info = fit_encoder(bundle, train, theta, batch_size, seed, EncoderFitConfig(steps=steps), held_out,
                                           eval_every, time_share, on_step, calibrate and held_out is not None)
        kind = fit_kind(bundle.manifest)
        record = {"kind": kind, "steps": len(losses), "forward_passes": info["forward_passes"], "best_step": info["best_step"],
                  "forward_passes_to_best": info["cache_passes"] + info["best_step"], "kept": True,
                  "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None}
        what = f" + {kind} fitted in {len(losses)} steps"
        if held_out is not None:
            record.update(eval_before=info["start"], eval_after=info["returned"], kept=info["best_step"] > 0,
                          temperature=info["temperature"],
                          evals=[{"step": k, "loss": m["loss"], "accuracy": m["accuracy"]} for k, m in info["evals"]])
            what += f" (held-out best at step {info['best_step']})" if record["kept"] else ""
            if calibrate:
                what += f", its logits scaled by {info['temperature']:.3g} on the held-out data"
                theta = fitted  # the start itself comes back calibrated when it stays the best point (eval_before)
    elif label_probe_tensors(bundle) and bundle.manifest.top_blocks is not None:
        fitted, losses, info = fit_prompt(bundle, train, theta, batch_size, seed, PromptFitConfig(steps=steps), held_out,
                                          eval_every, time_share, on_step)
        kind = fit_kind(bundle.manifest)
        record = {"kind": kind, "steps": len(losses), "forward_passes": info["forward_passes"], "best_step": info["best_step"],
                  "forward_passes_to_best": info["probe_passes"] + info["best_step"], "kept": info["kept"],
                  "probe_c": info["probe_c"], "train_loss_first": losses[0] if losses else None,
                  "train_loss_last": losses[-1] if losses else None}
        what = f" + {kind} fitted in {len(losses)} steps"
        if held_out is not None:
            record.update(eval_before=info["start"], eval_after=info["returned"], temperature=info["temperature"],
                          evals=[{"step": k, "loss": m["loss"], "accuracy": m["accuracy"]} for k, m in info["evals"]])
            what += (f" (held-out best at step {info['best_step']}, its logits scaled by {info['temperature']:.3g} there)"
                     if record["kept"] else "")
        else:
            record["train_after"] = info["train_after"]
    elif label_probe_tensors(bundle):
        fitted, record = fit_label_probe(bundle, train, theta)
        record["kind"] = "label-word probe"
        what = " + label-word probe on the answer's hidden state"
        record["kept"] = True
        if held_out is not None:
            before, after = evaluate(bundle, theta, held_out, 32), evaluate(bundle, fitted, held_out, 32)
            record.update(eval_before=before, eval_after=after,
                          kept=rank_key(bundle.task, after, True) > rank_key(bundle.task, before, True))
    else:
        return theta, None, ""
    if not record["kept"]:
        what += " (not kept: the start was better on held-out data)"
    return (fitted if record["kept"] else theta), record, what


def describe_fit(record: dict) -> str:
    first = record.get("train_loss_first", record.get("train_loss_before"))
    last = record.get("train_loss_last", record.get("train_loss_after"))
    text = f"{record['kind']}: " + (f"train loss {first:.4f} -> {last:.4f}" if first is not None else "no step in the budget")
    if "eval_before" in record:
        text += f", held-out loss {record['eval_before']['loss']:.4f} -> {record['eval_after']['loss']:.4f}"
        text += "" if record["kept"] else " (not kept)"
    return text
