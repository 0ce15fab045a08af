"""The training engine: the loop (`trainer`), `torchrun` setup (`distributed`), atomic checkpoints
(`checkpoint`), the default optimiser / schedule / EMA (`optim`) and the run folder (`logger`)."""

from hybridzoo.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_weights
from hybridzoo.engine.trainer import NonFiniteLossError, TrainResult, evaluate, train

__all__ = ["train", "evaluate", "TrainResult", "NonFiniteLossError", "CheckpointError", "atomic_save",
           "load_checkpoint", "save_weights"]
