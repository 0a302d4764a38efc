"""int8 and int4 passes: ONNX Runtime's quantisers on the frozen MatMul weights, adapters kept fp32.

int8: dynamic quantisation (``quantize_dynamic``); int4: weight-only blocks (``MatMulNBitsQuantizer``,
MatMulNBits nodes, symmetric, block 16 along the input dimension), activations stay fp32.

Left alone, ``quantize_dynamic`` also quantises the LoRA MatMuls and folds their
inputs away (research.md); every node that reads an adapter input — directly or
through the LoRA branch — is excluded, so the adapters stay trainable graph inputs.

Defaults, measured in benchmarks/bench_deploy.py (docs/DEPLOY.md):

* per-channel weight scales (one per output column): MiniLM on Rotten Tomatoes, int8 vs fp32 test
  accuracy (linear-probe start) went from -1.7 to -0.5 points, prediction agreement with fp32 from 93% to
  97%, at the same speed and size;
* 7-bit weights (``reduce_range``): an x86 CPU without VNNI (AVX2 only, as many laptops and this session-22
  machine) multiplies u8 activations by s8 weights in pairs summed into int16 (``vpmaddubsw``), which
  saturates at full 8-bit range: SmolLM2-135M's full-range int8 graph scored perplexity 6,511 there (fp32
  57.3 on the same Macbeth windows), 7-bit weights 60.7 (+6%), u8 weights (no saturation either) 59.5 but
  1.06x fp32's speed against 1.20x. The bundle's device is not known at export, so 7 bits everywhere
  (on a VNNI CPU, session 7, it had lowered MiniLM's agreement with fp32: docs/DEPLOY.md);
* the feed-forward down projections stay fp32: their input (silu(gate)·up in Llama, Mistral, Qwen2;
  GELU(up) in BERT) has outlier channels that one per-tensor activation scale cannot cover. SmolLM2-135M,
  perplexity on held-out text vs fp32: all MatMuls int8 +87%, down projections fp32 +6%, for about a
  quarter of the int8 speed-up (ZO step 1.48x -> 1.35x of fp32). MiniLM's merged Rotten Tomatoes probe,
  agreement with fp32 on 11,608 texts: all MatMuls int8 96.9%, down projections fp32 97.9%, file 0.26x ->
  0.37x of fp32 (docs/INT8-TABLES.md);
* embedding tables (the Gather that reads an initializer) int8 too, unless another node reads the same
  table (a tied LM head: quantising the lookup would add an int8 copy beside the fp32 weight the head
  still needs). MiniLM is half embedding: its merged int8 file went from 0.65x to 0.26x of fp32. A tied
  table that already lies on GGUF's Q8_0 grid is stored once as bytes for both readers, without rounding
  (``exact_tables.py``; int8 and int4 alike).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from edgeft.manifest import Manifest

from .onnx_files import large, load_model, save_model


def adapter_nodes(model: onnx.ModelProto, manifest: Manifest) -> list[str]:
    """Names of the nodes downstream of an adapter input, up to and including the Add that joins the base path."""
    adapter_inputs = {t.name for t in manifest.adapter.tensors}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found, stack = set(), list(adapter_inputs)
    while stack:
        tensor = stack.pop()
        for node in consumers.get(tensor, []):
            if node.name in found:
                continue
            found.add(node.name)
            if node.op_type != "Add":  # the Add joins the frozen path: stop there
                stack += list(node.output)
    return sorted(found)


GATED_FFN = ("llama", "mistral", "qwen2")  # architectures whose feed-forward is down(silu(gate(x)) * up(x))


def ffn_down_nodes(model: onnx.ModelProto) -> list[str]:
    """The frozen linear MatMuls that read the feed-forward hidden state (the widest linear input, wider
    than the layer's output): ``down_proj``. After LoRD the layer is two MatMuls; both are returned."""
    from .lord import linear_weights

    layers = linear_weights(model)
    if not layers:
        return []
    widest = max(w.dims[0] for _, w in layers)
    names = [n.name for n, w in layers if w.dims[0] == widest and w.dims[0] > w.dims[1]]
    present = {n.name for n in model.graph.node}
    partners = [n[: -len("/lord_in")] + "/lord_out" for n in names if n.endswith("/lord_in")]
    return names + [n for n in partners if n in present]


def shared_tables(model: onnx.ModelProto) -> list[str]:
    """Gather nodes whose table (an initializer) another node also reads: left to the MatMul pass."""
    initializers = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            if name in initializers:
                readers[name] = readers.get(name, 0) + 1
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in initializers and readers[n.input[0]] > 1]


def default_keep_fp32(model: onnx.ModelProto, architecture: str | None) -> list[str]:
    """Frozen MatMuls left fp32 by default: every feed-forward down projection (gated decoders and encoders
    alike: its input, the FFN's hidden state after the activation, has the outlier channels). ``architecture``
    is kept for callers; the rule no longer depends on it."""
    return ffn_down_nodes(model)


def quantize_int8(src: Path, dst: Path, manifest: Manifest | None, per_channel: bool = True,
                  reduce_range: bool = True, keep_fp32: list[str] | None = None,
                  architecture: str | None = None, tables: bool = True) -> list[str]:
    """Quantise ``src`` into ``dst``; returns the adapter nodes excluded (kept fp32).

    ``keep_fp32``: frozen MatMuls also left fp32; None = :func:`default_keep_fp32` for ``architecture``
    (default: the manifest's), ``[]`` = quantise every one. ``tables``: embedding lookups too (those no
    other node reads)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = load_model(src, weights=False)  # which nodes to exclude: the structure is enough
    if keep_fp32 is None:
        keep_fp32 = default_keep_fp32(model, architecture or (manifest.architecture if manifest else None))
    adapters = adapter_nodes(model, manifest) if manifest is not None else []
    shared = shared_tables(model)
    exclude = adapters + list(keep_fp32) + shared
    del model
    external = large(src)  # over 2 GB in, possibly over 2 GB out: weights in a side file
    with tempfile.TemporaryDirectory() as tmp:
        if tables and shared:  # a tied table on GGUF's Q8_0 grid: stored once as bytes (exact_tables.py)
            from .exact_tables import convert_tied_tables

            model = load_model(src)
            converted, heads = convert_tied_tables(model)
            if converted:
                src = Path(tmp) / "tables.onnx"
                save_model(model, src, external=external)
                exclude += heads
            del model
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference + graph cleanup recommended before quantising; optional
            quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_symbolic_shape=True,
                              save_as_external_data=external, all_tensors_to_one_file=True)
            source = prepared
        except Exception:
            source = src
        quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"] + (["Gather"] if tables else []),
                         per_channel=per_channel, reduce_range=reduce_range, nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=external)
    return adapters


# block of 16 along the input dimension: SmolLM2-135M perplexity on Macbeth (fp32 55.76), symmetric block 32 / 16:
# 65.71 / 62.60, asymmetric 32 / 16: 64.35 / 64.16 (docs/DEPLOY.md); 16 divides every linear input size here
INT4_BLOCK = 16


def quantize_int4(src: Path, dst: Path, manifest: Manifest | None, block_size: int = INT4_BLOCK,
                  keep_fp32: list[str] | None = None, architecture: str | None = None, log=None) -> list[str]:
    """Weight-only int4 of ``src``'s frozen MatMuls into ``dst`` (the same exclusions as int8); returns the
    adapter nodes excluded."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    from .exact_int4 import convert_exact_int4
    from .exact_tables import convert_tied_tables

    model = load_model(src)
    if keep_fp32 is None:
        keep_fp32 = default_keep_fp32(model, architecture or (manifest.architecture if manifest else None))
    adapters = adapter_nodes(model, manifest) if manifest is not None else []
    # weights already on a 4-bit grid (a GGUF's Q4_0/Q4_1 layers) convert losslessly, down projections too;
    # the rest is rounded by ONNX Runtime's quantiser
    exact, offset_branches = convert_exact_int4(model, set(adapters))
    tables, _ = convert_tied_tables(model)  # a GGUF's Q8_0 embedding (tied to the LM head): bytes, read by both
    if log is not None:
        log(f"int4: {len(exact)} frozen MatMuls were already on a 4-bit grid and converted without rounding"
            + (f"; {len(tables)} embedding table{'s' * (len(tables) > 1)} on an 8-bit grid stored as bytes" if tables else ""))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                     nodes_to_exclude=adapters + list(keep_fp32) + offset_branches,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=large(src))
    return adapters
