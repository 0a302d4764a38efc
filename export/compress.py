"""``edgeft compress``: bundle → lighter bundle that still trains (LoRD low-rank and/or int8 frozen weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.manifest import MODEL_NAME, TOKENIZER_NAME, Manifest

from .bundle import write_bundle
from .onnx_files import load_model, remove, save_model
from .quantize import quantize_int4, quantize_int8

QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def compress_bundle(bundle: Path, out: Path, params_ratio: float | None = None, energy: float | None = None,
                    calibrate: Path | None = None, quantize: str | None = None, log=print) -> dict:
    """LoRD (and optionally int8) → a new bundle with the same inputs, adapters and loss."""
    from edgeft.data import load_dataset

    from . import lord

    bundle, out = Path(bundle), Path(out)
    manifest = Manifest.load(bundle)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")
    model = load_model(bundle / MODEL_NAME)
    covariances = None  # filled from --calibrate data
    if calibrate is not None:
        from edgeft.runtime import Bundle

        b = Bundle(bundle)
        data = load_dataset(calibrate, b.labels if b.task != "causal-lm" else None)
        covariances = lord.collect_covariances(b, model, b.encode(data.texts, data.labels))
        log(f"calibrated on {len(data)} texts")
    plans, factors = lord.plan(model, params_ratio, energy, covariances)
    compressed = lord.apply(model, plans, factors, in_place=True)
    del model

    def write(tmp: Path) -> dict:
        target = tmp / (MODEL_NAME if not quantize else "model.fp32.onnx")
        save_model(compressed, target)
        if quantize:
            QUANTIZERS[quantize](target, tmp / MODEL_NAME, manifest)
            remove(target)
        _derived_manifest(bundle, manifest, tmp, keep_exact_fit=False)
        return {}

    write_bundle(out, write)
    before = sum(p.shape[0] * p.shape[1] for p in plans)
    after = sum(p.params for p in plans)
    return {"layers": [vars(p) | {"compressed": p.compressed} for p in plans], "linear_params_before": before,
            "linear_params_after": after, "kept": after / before if before else 1.0}


def quantize_bundle(bundle: Path, out: Path, keep_fp32: list[str] | None = None, bits: str = "int8", log=None) -> int:
    """Copy ``bundle`` to ``out`` with int8 (or int4) MatMul weights; adapter inputs and the loss stay fp32.
    ``keep_fp32``: see :func:`quantize_int8` (None: the architecture's default); ``log``: int4's report of the
    weights it converted without rounding. Returns the adapter nodes kept."""
    if bits not in QUANTIZERS:
        raise EdgeftError(f"unknown --quantize {bits!r} ({', '.join(QUANTIZERS)})")
    bundle, out = Path(bundle), Path(out)
    manifest = Manifest.load(bundle)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")

    def write(tmp: Path) -> dict:
        excluded = QUANTIZERS[bits](bundle / MODEL_NAME, tmp / MODEL_NAME, manifest, keep_fp32=keep_fp32,
                                    **({"log": log} if bits == "int4" else {}))
        _derived_manifest(bundle, manifest, tmp, bits=bits, keep_fp32=keep_fp32)
        return {"excluded": len(excluded)}

    return write_bundle(out, write)["excluded"]


def _derived_manifest(source: Path, manifest: Manifest, folder: Path, keep_exact_fit: bool = True,
                      bits: str | None = None, keep_fp32: list[str] | None = None) -> None:
    """The tokenizer, the adapters' stored start values and the source's manifest without its graph
    segments (they hold the source's weights). The exact fit of the top blocks, top MLP or encoder layers
    (``export/top_blocks.py``, ``export/top_mlp.py``, ``export/encoder_blocks.py``) stays for int8/int4 weights (``bits``)
    and is dropped for LoRD, whose low-rank factors
    replace the weights the gradient needs; that bundle's fitted LoRA is then searched like the rest
    of the body. The top blocks' and encoder layers' weights are then stored as the compressed graph holds
    them (``export/fit_weights.py``; fp32 copies where ``keep_fp32`` names nodes that cannot be told apart by
    role) and the top blocks' input comes from the compressed graph below them, so the fit holds each weight
    once, at the graph's precision. The top MLP's fit (bundles before session 18) keeps the fp32 originals."""
    coded = bits is not None and keep_fp32 in (None, [])
    shutil.copy(source / TOKENIZER_NAME, folder / TOKENIZER_NAME)
    if manifest.adapter.init_file:
        shutil.copy(source / manifest.adapter.init_file, folder / manifest.adapter.init_file)
    for kind in ("top_mlp", "top_blocks", "encoder_blocks"):
        top = getattr(manifest, kind)
        if top is not None and keep_exact_fit and kind != "top_mlp" and coded:
            _write_quantised_fit(source / top.weights, folder / top.weights, bits, down_fp32=keep_fp32 is None,
                                 encoder=kind == "encoder_blocks", graph=folder / MODEL_NAME)
        elif top is not None and keep_exact_fit:
            shutil.copy(source / top.weights, folder / top.weights)
        elif top is not None:
            setattr(manifest, kind, None)
    if manifest.top_blocks is not None:
        # the source's graph below the blocks holds its fp32 weights: cut the compressed graph below the blocks
        # instead. A tied table is the LM head the fit holds anyway, as the compressed graph holds it (fp32, or
        # its Q8_0 bytes): the fit embeds with it and the cut starts at hidden.0, so the table is in memory once
        # (a 1 B model's 400 MB). An untied table the graph quantised on its own: the cut starts at the token ids.
        from .top_blocks import BELOW, write_below_graph  # torch: only where there are top blocks

        top = manifest.top_blocks
        if top.embedding != "lm_head" or not coded:
            top.embedding = None
        top.below = BELOW if top.input != "hidden.0" else None
        if top.below is not None:
            write_below_graph(folder, manifest)
    if manifest.encoder_blocks is not None and not coded:
        manifest.encoder_blocks.embedding = None  # the fp32 tables are not the graph's: its input from the graph
    manifest.segments = None
    manifest.save(folder)


def _write_quantised_fit(src: Path, dst: Path, bits: str, down_fp32: bool, encoder: bool, graph: Path) -> None:
    from safetensors.numpy import save_file

    from edgeft.tensor_file import read_tensors

    from .encoder_blocks import EMBEDDING
    from .fit_weights import graph_tables, quantised_fit_weights

    tensors = read_tensors(src)
    if encoder:  # its embedding tables as the compressed graph holds them: the fit still embeds the tokens itself
        found = graph_tables(load_model(graph)) if any(n.startswith(EMBEDDING + ".") for n in tensors) else []
        out = quantised_fit_weights(tensors, bits, down_fp32=down_fp32, dropped=None, tables=(EMBEDDING, found))
    else:
        out = quantised_fit_weights(tensors, bits, tied="embed" not in tensors, down_fp32=down_fp32)
    save_file(out, str(dst))
