"""Run-folder checks made before any work starts, so a bad `--output` never costs a run.

`prepare_run_dir` (called by `engine.trainer.train` on rank 0, before data or model are built):

- refuses a folder that already holds a run (`summary.json`, `last.ckpt`, ...) unless the run is
  being resumed there or `--overwrite` is given — training there would overwrite its weights;
- refuses a path that is a file, and a folder it cannot create or write into (probed with a
  temporary file), instead of failing at the first checkpoint after an epoch of work;
- removes the temporary files (`.last.ckpt.tmp-PID`, `.curves.png.tmp-PID`, ...) that
  `checkpoint.atomic_write` leaves behind when its process is killed, once that process is gone.

`keep_finished_weights` preserves the weights of a finished run that `--resume` extends.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["RunDirError", "RUN_FILES", "prepare_run_dir", "check_writable", "clean_stale_temp_files",
           "keep_finished_weights", "check_same_classes"]

# what `hybridzoo train` writes; any of them means the folder holds a run
RUN_FILES = ("summary.json", "last.ckpt", "model.safetensors", "metrics.csv")
# atomic_write's temporary names: .<target>.tmp-<pid>
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


class RunDirError(ValueError):
    """The run folder cannot be used as asked (an existing run, a file, not writable)."""


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None,
                    overwrite: bool = False, verbose: bool = True) -> Path:
    """Check `run_dir` for a new or resumed run, create it, and clean dead processes' temp files."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output {os.fspath(run_dir)!r} is a file, not a folder; give a folder name "
                          "(it is created if missing)")
    resuming_here = resume is not None and Path(resume).resolve().parent == run_dir.resolve()
    if run_dir.is_dir() and not resuming_here and not overwrite:
        found = [f for f in RUN_FILES if (run_dir / f).exists()]
        if found:
            raise RunDirError(
                f"{os.fspath(run_dir)!r} already holds a run ({', '.join(found)}); training there would overwrite "
                f"it. Continue that run with --resume {os.fspath(run_dir / 'last.ckpt')}, choose a new --output "
                "folder, or pass --overwrite to replace it")
    check_writable(run_dir)
    removed = clean_stale_temp_files(run_dir)
    if removed and verbose:
        print(f"removed {len(removed)} temporary file(s) left in {os.fspath(run_dir)} by killed runs: "
              + ", ".join(p.name for p in removed))
    return run_dir


def check_writable(run_dir: str | os.PathLike) -> None:
    """Create `run_dir` and write, fsync and remove a probe file in it; an error names the folder and the cause."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run folder {os.fspath(run_dir)!r}: {e.strerror or e}; "
                          "choose another --output") from e
    # named like atomic_write's temp files, so a probe orphaned by a kill is cleaned up like them
    probe = run_dir / f".write-probe.tmp-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise RunDirError(f"the run folder {os.fspath(run_dir)!r} is not writable ({e.strerror or e}); "
                          "choose another --output") from e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours (or unknowable): leave its files alone
    return True


def clean_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files whose process no longer exists; returns what was removed.

    A pid only means something on this machine: folders shared between machines should not hold two
    live runs at once anyway (see --overwrite).
    """
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for p in sorted(run_dir.iterdir()):
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def keep_finished_weights(run_dir: str | os.PathLike, epoch: int) -> list[Path]:
    """Copy the finished run's weights to `model.epoch<N>.safetensors` (and the EMA's) before they are extended."""
    run_dir = Path(run_dir)
    kept = []
    for name in ("model", "model_ema"):
        src = run_dir / f"{name}.safetensors"
        dst = run_dir / f"{name}.epoch{epoch}.safetensors"
        if src.is_file() and not dst.exists():
            from hybridzoo.engine.checkpoint import atomic_write

            with open(src, "rb") as f:
                atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
            kept.append(dst)
    return kept


def check_same_classes(weights: str | os.PathLike | None, data_info: dict, trained: dict | None = None) -> None:
    """Refuse to evaluate weights trained on other classes than the data's (scores against another class
    list would be silently wrong). `trained` is the run's data info when already loaded; otherwise only
    weights that record their classes (a run's `model.safetensors` or `last.ckpt`) can be checked.
    """
    if trained is None:
        if not weights:
            return
        from hybridzoo.engine.checkpoint import read_run

        try:
            trained = read_run(checkpoint=weights).get("data_info") or {}
        except Exception:  # an official checkpoint or a plain state dict: nothing recorded to compare
            return
    n_run, n_data = trained.get("num_classes"), data_info.get("num_classes")
    names_run, names_data = trained.get("class_names"), data_info.get("class_names")
    if n_run is None or n_data is None:
        return
    if int(n_run) != int(n_data) or (names_run and names_data and list(names_run) != list(names_data)):
        def show(names, n):
            return f"{n} classes {list(names)}" if names else f"{n} classes"

        raise ValueError(f"{os.fspath(weights)!r} was trained on {show(names_run, n_run)}, but the data has "
                         f"{show(names_data, n_data)}; its classifier does not fit this data (evaluating would "
                         "report a random head's score). Evaluate on data with the run's classes, or fine-tune "
                         "with `hybridzoo train --pretrained`")
