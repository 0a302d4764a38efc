"""``edgeft deploy``, ``compress`` and ``split``: a trained bundle made ready to ship (workstation side)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeft.cli_common import Command, split_list
from edgeft.errors import EdgeftError


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="Adapter folder from edgeft train.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--merge", is_flag=True, help="Fold the adapter into the weights: a plain inference graph.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Dynamic int8 quantisation of the frozen weights.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="ort: ONNX Runtime's own format (model.ort), what ORT Mobile on Android and iOS loads.")
@click.option("--also-for", "also_for", multiple=True, type=click.Choice(["genai", "olive"]),
              help="Also write the adapter under the input names of a LoRA-ready model from ORT GenAI's builder "
                   "(adapter.genai.onnx_adapter) or Olive (adapter.olive.onnx_adapter).")
def deploy(bundle, adapter, out, merge, quantize, fmt, also_for):
    """Package a trained adapter for inference: ORT adapter file (default) or merged graph."""
    from edgeft.export.deploy import deploy as run_deploy

    report = run_deploy(bundle, adapter, out, merge=merge, quantize=quantize, fmt=fmt, also_for=tuple(also_for))
    left = json.loads((Path(out) / "deploy.json").read_text()).get("left_out_of_foreign_files")
    if left:
        click.echo(f"note: not in the --also-for files (no LoRA input there): {', '.join(left)}", err=True)
    for key, value in report.items():
        click.echo(f"check: {key} {value:.4g}" if key != "size_mb" else f"size: {value} MB")
    click.echo(f"deployed to {out}")


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@click.option("--params-ratio", type=float, help="LoRD: fraction of each linear layer's parameters to keep.")
@click.option("--energy", type=float, help="LoRD: fraction of spectral energy to keep per layer.")
@click.option("--calibrate", type=click.Path(path_type=Path), help="Activation-aware LoRD on this data's activations.")
@click.option("--quantize", type=click.Choice(["int8", "int4"]),
              help="int8 (dynamic) or int4 (weight-only, MatMulNBits; weights already on a 4-bit grid, as a Q4_0/Q4_1 "
                   "GGUF's, convert without rounding) frozen weights; adapters fp32 and trainable.")
@click.option("--trained-rank", is_flag=True, help="TRP: train on --data between low-rank cuts, so the ranks are chosen "
                                                   "while the bundle trains (needs --data; --energy default 0.9).")
@click.option("--data", type=click.Path(path_type=Path), help="--trained-rank: training data (as for edgeft train).")
@click.option("--eval-data", type=click.Path(path_type=Path), help="--trained-rank: held-out data to keep each segment's best.")
@click.option("--folds", default=4, show_default=True, help="--trained-rank: low-rank cuts (training segments).")
@click.option("--shrink", default=0.01, show_default=True,
              help="--trained-rank: singular-value soft threshold per cut, as a fraction of the layer's mean one.")
@click.option("--steps", type=int, help="--trained-rank: training steps over the whole run.")
@click.option("--budget", help="--trained-rank: training budget over the whole run, e.g. 400fwd or 20m.")
@click.option("--optimizer", default="auto", show_default=True, help="--trained-rank: the training optimizer.")
@click.option("--k-shot", type=int, help="--trained-rank: examples per label drawn from --data.")
@click.option("--batch-size", type=int)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", help="--trained-rank: device profile for the training segments.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the report) instead of lines.")
def compress(bundle, out, params_ratio, energy, calibrate, quantize, trained_rank, data, eval_data, folds, shrink, steps,
             budget, optimizer, k_shot, batch_size, seed, device, as_json):
    """A lighter bundle that still trains: LoRD low-rank and/or int8/int4 frozen weights; adapters and loss
    untouched. With --trained-rank the low-rank cuts alternate with forward-only training (TRP)."""
    from edgeft.export.compress import compress_bundle, quantize_bundle

    if trained_rank:
        _trained_rank(bundle, out, energy, params_ratio, calibrate, quantize, data, eval_data, folds, shrink, steps,
                      budget, optimizer, k_shot, batch_size, seed, device, as_json)
        return
    training_only = {"--data": data, "--eval-data": eval_data, "--steps": steps, "--budget": budget,
                     "--k-shot": k_shot, "--batch-size": batch_size, "--device": device}
    given = [name for name, value in training_only.items() if value is not None]
    if given:
        raise EdgeftError(f"{given[0]} trains: it needs --trained-rank")
    if params_ratio is None and energy is None:
        if not quantize:
            raise EdgeftError("compress needs --params-ratio, --energy or --quantize")
        excluded = quantize_bundle(bundle, out, bits=quantize, log=lambda m: click.echo(m, err=True))
        click.echo(json.dumps({"excluded": excluded, "bundle": str(out)}) if as_json
                   else f"{quantize} bundle written to {out} ({excluded} adapter nodes kept fp32)")
        return
    if calibrate is None:  # measured on SmolLM2 (docs/DEPLOY.md): plain SVD at 80% params → perplexity 2.8e6
        click.echo("warning: without --calibrate the SVD ignores which directions the data uses; on a causal LM "
                   "(SmolLM2-135M) that wrecked the model at every ratio tried. Pass --calibrate DATA.", err=True)
    report = compress_bundle(bundle, out, params_ratio, energy, calibrate, quantize, log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    _print_ranks(report, out)


def _print_ranks(report: dict, out: Path) -> None:
    for layer in report["layers"]:
        state = f"rank {layer['rank']}" if layer["compressed"] else "kept"
        click.echo(f"{layer['node']}: {layer['shape'][0]}x{layer['shape'][1]} {state} (energy {layer['energy']:.3f})")
    click.echo(f"linear parameters {report['linear_params_before']:,} -> {report['linear_params_after']:,} "
               f"({report['kept']:.1%} kept); bundle written to {out}")


def _trained_rank(bundle, out, energy, params_ratio, calibrate, quantize, data, eval_data, folds, shrink, steps, budget,
                  optimizer, k_shot, batch_size, seed, device, as_json) -> None:
    from edgeft.export.trained_rank import TrainedRankRequest, trained_rank

    if data is None:
        raise EdgeftError("--trained-rank trains between its cuts: it needs --data TRAIN")
    if params_ratio is not None or quantize:
        raise EdgeftError("--trained-rank chooses ranks by --energy; --params-ratio and --quantize do not apply "
                          "(quantize its output with a second edgeft compress --quantize int8)")
    request = TrainedRankRequest(bundle, out, data, energy if energy is not None else 0.9, folds, shrink, calibrate,
                                 steps, budget, optimizer, eval_data, k_shot, batch_size, seed, device,
                                 progress=not as_json)
    report = trained_rank(request, log=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(report, sort_keys=True, default=str))
        return
    _print_ranks(report, out)
    click.echo(f"trained adapter (last segment): {report['adapter']}")


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--at", "layers", required=True, help="Comma-separated layers to cut the graph at, e.g. 1,2,3,4,5.")
def split(bundle, layers):
    """Cut the graph into segments at layer boundaries: a training step whose candidates differ
    only above a cut runs the layers below it once per batch (layer-wise DFO, adapters on
    the top layers only). Replaces an earlier split of BUNDLE."""
    from edgeft.export.split import split_bundle

    bad = [x for x in split_list(layers) if not x.isdigit()]
    if bad:
        raise EdgeftError(f"--at: {bad[0]!r} is not a layer number")
    split_bundle(bundle, [int(x) for x in split_list(layers)], log=lambda m: click.echo(m))
