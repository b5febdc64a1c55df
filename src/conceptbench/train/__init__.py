"""The shared training core: one loop (core.py) driving small method classes (method.py)."""

from .core import NonFiniteLoss, run_training, step_generator, train, train_config
from .method import Method, MethodError, TrainContext

__all__ = ["Method", "MethodError", "NonFiniteLoss", "TrainContext", "run_training", "step_generator", "train",
           "train_config"]
