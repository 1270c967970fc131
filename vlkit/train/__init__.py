"""The one trainer shared by every recipe."""

from vlkit.train.config import TrainConfig
from vlkit.train.trainer import Stream, Trainer

__all__ = ["Stream", "TrainConfig", "Trainer"]
