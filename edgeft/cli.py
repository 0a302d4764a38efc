"""The ``edgeft`` command: export, train, eval, predict, info, plan, deploy, compress, split, fleet, demo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeft.cli_common import Command, split_list
from edgeft.errors import EdgeftError


@click.group()
@click.version_option(package_name="edgeft")
def main():
    """Fine-tune transformers on edge devices with forward passes only."""


def _verbalizer(value: str | None) -> dict[str, str]:
    out = {}
    for item in split_list(value):
        label, sep, word = item.partition("=")
        if not sep or not word:
            raise EdgeftError(f"--verbalizer item {item!r} is not LABEL=WORD")
        out[label.strip()] = word.strip()
    return out


# --- export ------------------------------------------------------------------


@main.command(cls=Command)
@click.argument("source")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--task", type=click.Choice(["classification", "prompt", "causal-lm"]), default="classification")
@click.option("--gguf-file", help="GGUF file name inside SOURCE (a folder), e.g. model.Q4_1.gguf.")
@click.option("--labels", help="Comma-separated label names (classification, prompt).")
@click.option("--template", "templates", multiple=True,
              help='Prompt template with {text}; masked LMs also need {mask}, e.g. "{text} It was {mask}." '
                   'Give several with --template-data to keep the one with the best zero-shot score.')
@click.option("--template-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Labelled held-out data (prompt): the template that scores best on it, untrained, is kept.")
@click.option("--verbalizer", help='Label words, e.g. "neg=terrible,pos=great".')
@click.option("--adapter", type=click.Choice(["lora", "loldu", "tt", "bone"]), default="lora", show_default=True,
              help="lora: x·Aᵀ·Bᵀ beside each layer; loldu: LDU of W, diagonal + scale trained; "
                   "tt: tensor-train cores form ΔW; bone: block affine ΔW from W's own blocks.")
@click.option("--rank", default=8, show_default=True, help="LoRA/TT rank, LoLDU kept rank, Bone block size.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA/TT update scale is alpha/rank.")
@click.option("--init", "init", type=click.Choice(["zeros", "pissa"]), default="zeros", show_default=True,
              help="LoRA start: B = 0, or PiSSA (principal singular vectors; residual weights frozen).")
@click.option("--tt-cores", default=3, show_default=True, help="Tensor-train cores per adapted layer (--adapter tt).")
@click.option("--targets", help="Comma-separated module names to adapt (default: per architecture).")
@click.option("--layers", help="top:N: adapters on the top N layers only; the graph is cut below them so training "
                               "runs the frozen layers once per batch (default: all).")
@click.option("--fit-layers", type=int, help="The top layers the device fits from their exact gradient: causal LM (Llama) "
                                             "their MLP LoRA (default: the top 80% of the layers, or N of --layers top:N; 0: the output bias only); "
                                             "classification (BERT) their LoRA with the head (default: all adapted layers; 0: none).")
@click.option("--pooling", type=click.Choice(["mean", "mean-normalized", "cls", "cls-pooler", "last-token"]),
              help="Classification pooling (default: what the model was trained with).")
@click.option("--max-length", default=128, show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Compare ONNX with torch at a second shape.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]),
              help="Also write BUNDLE-int8 (or -int4): frozen weights quantised, adapters fp32.")
def export(source, out, task, gguf_file, labels, templates, template_data, verbalizer, adapter, rank, alpha, init, tt_cores, targets,
           layers, fit_layers, pooling, max_length, verify, quantize):
    """Export SOURCE (Hugging Face folder or id, GGUF) to a bundle."""
    from edgeft.export import ExportOptions, export_bundle

    if source.endswith(".gguf") and not gguf_file:
        source, gguf_file = str(Path(source).parent), Path(source).name
    options = ExportOptions(task=task, labels=split_list(labels), template=templates[0] if templates else None,
                            templates=list(templates), template_data=template_data, verbalizer=_verbalizer(verbalizer),
                            adapter=adapter, rank=rank, alpha=alpha, init=init, tt_cores=tt_cores,
                            targets=split_list(targets) or None, layers=layers, fit_layers=fit_layers, max_length=max_length,
                            pooling=pooling, gguf_file=gguf_file)
    report = export_bundle(source, out, options, verify=verify, log=lambda m: click.echo(m, err=True))
    for name, diff in report.items():
        click.echo(f"verify: {name} max |onnx - torch| = {diff:.2e} (batch 3, sequence 11)")
    click.echo(f"bundle written to {out}")
    if quantize:
        from edgeft.export.compress import quantize_bundle

        quantized = out.with_name(f"{out.name}-{quantize}")
        excluded = quantize_bundle(out, quantized, bits=quantize, log=lambda m: click.echo(m, err=True))
        click.echo(f"{quantize} bundle written to {quantized} ({excluded} adapter nodes kept fp32)")


# --- train -------------------------------------------------------------------


@main.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Training data (.jsonl, .csv, .tsv).")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out data for periodic evaluation.")
@click.option("--optimizer", default="auto", show_default=True,
              help="A registered optimizer, or auto: the recipe README's 'Choosing a recipe' states.")
@click.option("--steps", type=int, help="Optimizer steps (default 500, or as many as --budget allows).")
@click.option("--budget", help="Stop when this is spent: wall time (90s, 20m, 1.5h) or forward passes (4000fwd). "
                               "Default: the device profile's.")
@click.option("--batch-size", help="Default: the device profile's; auto: the largest that fits the profile's "
                                   "memory budget (edgeft plan).")
@click.option("--lr", type=float, help="Learning rate (default: the optimizer's).")
@click.option("--eps", type=float, help="Perturbation size ε.")
@click.option("--queries", help="SPSA queries per step, or 'auto' (AdaZeta's growing schedule).")
@click.option("--weight-decay", type=float)
@click.option("--schedule", type=click.Choice(["constant", "linear"]))
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other optimizer setting, e.g. --set popsize=20 --set intrinsic_dim=64 (repeatable).")
@click.option("--k-shot", type=int, help="Use K examples per label of --data (balanced, drawn with --seed).")
@click.option("--eval-every", default=50, show_default=True)
@click.option("--eval-limit", type=int, help="Evaluate on at most this many held-out examples.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", help="Device profile name or .toml path.")
@click.option("--init-adapter", type=click.Path(path_type=Path), help="Start from this adapter (e.g. saved by PEFT).")
@click.option("--output-fit-steps", type=int,
              help="Steps of the causal LM's output fit (output bias + the top blocks' MLP LoRA, exact gradient) before the "
                   "search; default: the whole --budget under --optimizer auto when the bundle has that "
                   "LoRA, else 40; 0: no output adapter fit at all (nor a prompt bundle's label-word probe).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a finished or broken run in RUN_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on, off with --json).")
def train(bundle, data, run_dir, eval_data, optimizer, steps, budget, batch_size, lr, eps, queries, weight_decay, schedule, extra,
          k_shot, eval_every, eval_limit, seed, device, init_adapter, output_fit_steps, text_field, label_field, resume,
          overwrite, as_json, progress):
    """Fine-tune BUNDLE's adapters on --data with forward passes only."""
    from edgeft.training import TrainRequest, run_training

    fit_memory = batch_size == "auto"
    if batch_size is not None and not fit_memory and not str(batch_size).isdigit():
        raise EdgeftError(f"--batch-size {batch_size!r}: a whole number or auto")
    request = TrainRequest(
        bundle=bundle, data=data, run_dir=run_dir, eval_data=eval_data, optimizer=optimizer, steps=steps, budget=budget,
        batch_size=None if fit_memory or batch_size is None else int(batch_size), fit_memory=fit_memory,
        settings=dict(lr=lr, eps=eps, queries=_queries(queries), weight_decay=weight_decay, schedule=schedule,
                      **_settings(extra)),
        k_shot=k_shot, eval_every=eval_every, eval_limit=eval_limit, seed=seed, device=device, init_adapter=init_adapter,
        output_fit_steps=output_fit_steps, text_field=text_field, label_field=label_field, resume=resume, overwrite=overwrite,
        progress=(not as_json) if progress is None else progress,
    )
    summary = run_training(request, log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)


def _queries(value: str | None):
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise EdgeftError(f"--queries must be a positive integer or 'auto', not {value!r}")
    return int(value)


def _settings(items) -> dict:
    """--set KEY=VALUE pairs, values read as int, float, true/false or text."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise EdgeftError(f"--set {item!r} is not KEY=VALUE")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key.strip().replace("-", "_")] = value
    return out


def _print_summary(summary: dict) -> None:
    click.echo(f"steps {summary['steps']}, forward passes {summary['forward_passes']}, "
               f"{summary['wall_s']:.1f} s, peak RSS {summary['peak_rss_mb']:.0f} MB")
    for key in ("start", "best"):
        if summary.get(key):
            click.echo(f"{key:>5}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary[key].items()))
    click.echo(f"adapter saved to {summary['adapter']}")


# --- eval / predict / info ---------------------------------------------------


@main.command(name="eval", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path))
@click.option("--adapter", type=click.Path(path_type=Path), help="Adapter folder (default: the untrained start).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--samples", type=int, help="Average N adapters drawn from the adapter's distribution (--optimizer monteclora).")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(bundle, data, adapter, batch_size, device, text_field, label_field, samples, as_json):
    """Accuracy, loss and calibration error (classification, prompt) or perplexity (causal-lm) on --data."""
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle, evaluate, load_profile
    from edgeft.runtime.evaluate import evaluate_sampled
    from edgeft.runtime.memory import budget_warning, peak_rss_mb

    profile = load_profile(device)
    b = Bundle(bundle, profile)
    sigma = _distribution(b, adapter, samples)
    dataset = load_dataset(data, b.labels, text_field, label_field)
    vector = _adapter_vector(b, adapter)
    encoded = b.encode(dataset.texts, dataset.labels)
    metrics = (evaluate_sampled(b, vector, sigma, encoded, samples, batch_size) if samples
               else evaluate(b, vector, encoded, batch_size))
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
    else:
        click.echo(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    warning = budget_warning(metrics["peak_rss_mb"], profile.memory_budget_mb, profile.name)
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _distribution(b, adapter: Path | None, samples: int | None):
    """The adapter's spread for --samples (checked before any work), or None without --samples."""
    from edgeft.distribution import load_distribution

    if samples is None:
        return None
    if samples < 1:
        raise EdgeftError(f"--samples {samples}: needs at least 1 sampled adapter")
    if b.task == "causal-lm":
        raise EdgeftError("--samples averages label predictions: classification and prompt bundles only")
    if adapter is None:
        raise EdgeftError("--samples needs --adapter (a folder trained with --optimizer monteclora)")
    return load_distribution(adapter, b.layout)


def _adapter_vector(b, adapter: Path | None):
    from edgeft.adapters import load_adapter

    if adapter is None:
        if any(t.role == "head_weight" for t in b.layout.tensors):
            click.echo("note: no --adapter: the classification head is all zeros", err=True)
        return b.layout.initial()
    return load_adapter(adapter, b.layout)


@main.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.option("--adapter", type=click.Path(path_type=Path))
@click.option("--device")
@click.option("--samples", type=int, help="Average N adapters drawn from the adapter's distribution; prints each spread.")
@click.option("--json", "as_json", is_flag=True)
def predict(bundle, texts, adapter, device, samples, as_json):
    """Label each TEXT (classification, prompt bundles)."""
    import numpy as np

    from edgeft.runtime import Bundle, load_profile
    from edgeft.runtime import predict as predict_probs
    from edgeft.runtime.evaluate import sampled_probabilities

    b = Bundle(bundle, load_profile(device))
    if b.task == "causal-lm":
        raise EdgeftError("predict labels texts; a causal-lm bundle has no labels (use eval for perplexity)")
    sigma = _distribution(b, adapter, samples)
    vector = _adapter_vector(b, adapter)
    if samples:
        encoded = b.encode(list(texts), np.zeros(len(texts), dtype=np.int64))
        probs, spread = sampled_probabilities(b, vector, sigma, encoded, samples)
    else:
        probs, spread = predict_probs(b, vector, list(texts)), None
    rows = [{"text": t, "label": b.labels[int(p.argmax())], "probability": round(float(p.max()), 4)} for t, p in zip(texts, probs)]
    for i, row in enumerate(rows):
        if spread is not None:
            row["spread"] = round(float(spread[i]), 4)
        extra = f"\t±{row['spread']:.3f}" if spread is not None else ""
        click.echo(json.dumps(row) if as_json else f"{row['label']}\t{row['probability']:.3f}{extra}\t{row['text']}")


@main.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
def info(bundle):
    """Describe a bundle: task, labels, adapters, graph inputs and outputs."""
    from edgeft.adapters import bundle_layout
    from edgeft.manifest import MODEL_NAME, Manifest

    m = Manifest.load(bundle)
    layout = bundle_layout(bundle, m)
    size = sum(p.stat().st_size for p in Path(bundle).glob(MODEL_NAME + "*")) / 1e6
    click.echo(f"task: {m.task}   architecture: {m.architecture}   source: {m.source}")
    if m.labels:
        click.echo(f"labels: {', '.join(m.labels)}")
    if m.template:
        click.echo(f"template: {m.template!r}   verbalizer: {m.verbalizer}")
    if m.pooling:
        click.echo(f"pooling: {m.pooling}")
    kind = m.adapter.kind + (f" ({m.adapter.init} init)" if m.adapter.init != "zeros" else "")
    click.echo(f"adapter: {kind} r={m.adapter.rank} alpha={m.adapter.alpha} on {', '.join(m.adapter.targets)}: "
               f"{len(layout.tensors)} tensors, {layout.trainable_adapter_values:,} adapter values"
               + (f" + {layout.size - layout.trainable_adapter_values:,} head or output-bias values" if layout.size > layout.trainable_adapter_values else ""))
    click.echo(f"inputs: {', '.join(n for n in m.inputs if n not in layout.names())} + adapters")
    hidden = f" + hidden.0-{len(m.hidden_states) - 1}" if m.hidden_states else ""
    click.echo(f"outputs: {', '.join(m.outputs)}{hidden}   max length: {m.max_length}   model: {size:.1f} MB")


@main.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", help="Device profile (its memory_budget_mb is the budget).")
@click.option("--batch-size", type=int, help="Training batch (default: the profile's).")
@click.option("--max-length", type=int, help="Sequence length (default: the bundle's).")
@click.option("--search", is_flag=True, help="A search on the whole graph follows a causal LM's output fit "
              "(train with --steps or a named --optimizer); default: the default recipe with a budget.")
@click.option("--json", "as_json", is_flag=True)
def plan(bundle, device, batch_size, max_length, search, as_json):
    """Predict the peak memory of train and eval from short probes, and the largest batch that fits."""
    from edgeft.runtime.devices import load_profile
    from edgeft.runtime.plan import describe, plan_memory

    if (batch_size is not None and batch_size < 1) or (max_length is not None and max_length < 2):
        raise EdgeftError("--batch-size must be at least 1 and --max-length at least 2")
    result = plan_memory(bundle, device, batch_size, max_length, search=search)
    click.echo(json.dumps(result.to_dict(), sort_keys=True) if as_json else describe(result, load_profile(device).name))


@main.command(cls=Command)
@click.option("--name", type=click.Choice(["smollm2-sentiment", "minilm-rotten-tomatoes"]), default="smollm2-sentiment",
              show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("edgeft-demo"), show_default=True)
@click.option("--steps", type=int, help="Fine-tuning steps (default: the demo's budget).")
@click.option("--test-size", type=int, help="Held-out examples to evaluate on.")
def demo(name, workdir, steps, test_size):
    """Real model, real data, offline: export, evaluate, fine-tune forward-only, evaluate again."""
    from edgeft.demo import DEMOS, run_demo

    run_demo(workdir, DEMOS[name], steps=steps, test_size=test_size, log=lambda m: click.echo(m))


def _register() -> None:
    """The workstation's shipping commands and the fleet live in their own modules (cli_ship, cli_fleet)."""
    from edgeft.cli_fleet import fleet
    from edgeft.cli_ship import compress, deploy, split

    for command in (deploy, compress, split, fleet):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
