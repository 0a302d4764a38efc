"""edgeft: export a transformer once, fine-tune it on the device with forward passes only."""

__version__ = "0.1.0"
