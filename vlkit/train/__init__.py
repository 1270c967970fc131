"""The one trainer shared by every recipe."""

from vlkit.train.config import TrainConfig
from vlkit.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
