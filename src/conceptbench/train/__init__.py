"""The shared training core: one loop (core.py) driving small method classes (method.py)."""

from .core import NonFiniteLoss, run_training, step_generator, train
from .method import Method, MethodError, TrainContext
from .settings import train_config

__all__ = ["Method", "MethodError", "NonFiniteLoss", "TrainContext", "run_training", "step_generator", "train",
           "train_config"]
