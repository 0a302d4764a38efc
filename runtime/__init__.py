"""edgeft on the device: run a bundle with ONNX Runtime and fine-tune it with forward passes only.

Imports numpy, onnxruntime, tokenizers and safetensors — never torch.
"""

from .bundle import Bundle, Encoded
from .devices import DeviceProfile, load_profile
from .evaluate import CandidateEvaluator, evaluate, pooled_features, predict
from .optimizers import REGISTRY, MeZO, MeZOConfig, make_optimizer
from .probe import fit_linear_probe
from .start import starting_adapter
from .statistics import layer_input_std
from .trainer import TrainConfig, Trainer

__all__ = [
    "Bundle", "CandidateEvaluator", "DeviceProfile", "Encoded", "MeZO", "MeZOConfig", "REGISTRY",
    "TrainConfig", "Trainer", "evaluate", "fit_linear_probe", "load_profile", "make_optimizer",
    "layer_input_std", "pooled_features", "predict", "starting_adapter",
]
