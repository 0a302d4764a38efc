"""edgeft on the workstation: turn a transformer into a bundle (needs torch + transformers + onnx)."""

from .bundle import ExportOptions, export_bundle

__all__ = ["ExportOptions", "export_bundle"]
