"""The training engine: the loop (`trainer`), its state (`state.TrainState`, what last.ckpt holds), the
metric contract (`metrics`), `torchrun` setup (`distributed`), atomic checkpoints (`checkpoint`), the
default optimiser / schedule / EMA (`optim`) and the run folder (`logger`)."""

from hybridzoo.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_weights
from hybridzoo.engine.state import TrainState
from hybridzoo.engine.trainer import NonFiniteLossError, TrainResult, evaluate, train

__all__ = ["train", "evaluate", "TrainResult", "TrainState", "NonFiniteLossError", "CheckpointError", "atomic_save",
           "load_checkpoint", "save_weights"]
