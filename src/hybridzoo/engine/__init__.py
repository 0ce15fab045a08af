"""The training engine: the loop (`trainer`), `torchrun` setup (`distributed`), atomic checkpoints
(`checkpoint`), the default optimiser / schedule / EMA (`optim`), the run folder (`logger`) and the one
way to load a trained run for eval / predict / export (`run`)."""

from hybridzoo.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_weights
from hybridzoo.engine.run import Run, load_run
from hybridzoo.engine.trainer import NonFiniteLossError, TrainResult, evaluate, train

__all__ = ["train", "evaluate", "TrainResult", "NonFiniteLossError", "CheckpointError", "atomic_save",
           "load_checkpoint", "save_weights", "load_run", "Run"]
