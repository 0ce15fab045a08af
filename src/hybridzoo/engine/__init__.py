"""The training engine: the loop (`trainer`), its state (`state.TrainState`, what last.ckpt holds), the
metric contract (`metrics`), `torchrun` setup (`distributed`), atomic checkpoints (`checkpoint`), the
default optimiser / schedule / EMA (`optim`), the run folder (`logger`, `rundir`) and the one way to load
a trained run for eval / predict / export (`run`)."""

from hybridzoo.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_weights
from hybridzoo.engine.run import Run, load_run
from hybridzoo.engine.state import TrainState
from hybridzoo.engine.trainer import NonFiniteLossError, TrainResult, evaluate, train

__all__ = ["train", "evaluate", "TrainResult", "TrainState", "NonFiniteLossError", "CheckpointError", "atomic_save",
           "load_checkpoint", "save_weights", "load_run", "Run"]
