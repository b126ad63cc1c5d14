"""What every stage shares about its output folder: atomic writes, the finished marker, metrics.

A stage writes into `output_dir`. When it finishes it writes `result.json` last (atomically), so a
folder with `result.json` is a finished run and is never silently overwritten; a folder without it
holds an interrupted run that the same command resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


@dataclass
class StageResult:
    stage: str
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items())
        return f"{self.stage} finished in {self.seconds:.0f}s -> {self.output_dir} ({shown})"

    def save(self) -> None:
        """The finished marker, written last; the run this one replaced (overwrite=true) can go now."""
        atomic_write_json(Path(self.output_dir) / RESULT_FILE, asdict(self))
        shutil.rmtree(previous_run_dir(self.output_dir), ignore_errors=True)

    @classmethod
    def load(cls, output_dir: str | Path) -> StageResult | None:
        path = Path(output_dir) / RESULT_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


class DivergedError(RuntimeError):
    """A non-finite loss or gradient: the run stops, the last good checkpoint stays (one line)."""

    def __init__(self, stage: str, step: int, what: str, value: float, output_dir):
        super().__init__(f"{stage} diverged at step {step}: {what} is {value}; nothing after the last checkpoint in "
                         f"{output_dir} was kept. Lower train.learning_rate (or check the data), then run again to resume")


class OutputExistsError(RuntimeError):
    pass


class OutputDirError(OSError):
    """output_dir cannot be written (a file, a read-only place, no permission)."""


PREVIOUS_SUFFIX = ".previous"


def previous_run_dir(output_dir: str | Path) -> Path:
    """Where overwrite=true keeps the finished run it replaces until the new run finishes."""
    out = Path(output_dir)
    return out.with_name(out.name + PREVIOUS_SUFFIX)


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Create output_dir; refuse to write over a finished run unless overwrite is set. Overwriting starts
    over, but loses nothing yet: the finished run is moved to `<output_dir>.previous` (one rename) and is
    deleted only when the new run finishes (StageResult.save), so a run that fails on bad input leaves it
    there to move back. An unfinished run is left for the stage to resume. Under several processes rank 0
    moves and the others wait."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    if (out / RESULT_FILE).is_file():
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a finished run; choose another output_dir or pass overwrite=true"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            previous = previous_run_dir(out)
            if previous.exists():  # an older replaced run, itself superseded by the finished one in `out`
                shutil.rmtree(previous)
            os.replace(out, previous)
            print(f"overwrite=true: the finished run in {out} was moved to {previous}; it is deleted when the new run finishes")
        else:
            deadline = time.time() + 600
            while (out / RESULT_FILE).is_file() and time.time() < deadline:
                time.sleep(0.2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"output_dir {out} cannot be written ({e.strerror or e}); choose a writable output_dir") from None
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temp folder into place; the old folder is removed only afterwards."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl; mirrors to tensorboard/wandb when asked."""

    def __init__(self, output_dir: str | Path, report_to: list[str] = (), run_name: str | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run_name = run_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self._wandb = wandb.init(project="m1-align", name=run_name, dir=str(output_dir))

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": step, "time": round(time.time() - self.start, 3), **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we resume from."""
        if not self.path.is_file():
            return
        keep = [json.dumps(record) for record in read_metrics(self.path.parent) if record["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line torn by a kill mid-write is dropped with a note, not an error."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: {path} line {number} is incomplete (the run was stopped while writing it); dropped")
    return records


# ---------------------------------------------------------------------------------------------
# Checkpoint completeness: a marker written last lists every file and its size
# ---------------------------------------------------------------------------------------------

COMPLETE_FILE = "complete.json"


class IncompleteCheckpointError(RuntimeError):
    pass


def mark_complete(folder: str | Path) -> None:
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_FILE}
    atomic_write_json(folder / COMPLETE_FILE, {"files": files})


def check_complete(folder: str | Path, required: tuple[str, ...] = ()) -> None:
    """Raise IncompleteCheckpointError (one line, with the fix) unless `folder` has its marker, every file
    the marker lists at its size, and every `required` file."""
    folder = Path(folder)
    fix = f"restore it, or delete {folder} to resume from an earlier checkpoint (overwrite=true starts over)"
    marker = folder / COMPLETE_FILE
    if not marker.is_file():
        raise IncompleteCheckpointError(f"checkpoint {folder} has no {COMPLETE_FILE} (it was not finished); {fix}")
    listed = json.loads(marker.read_text())["files"]
    for name in (*required, *listed):
        path = folder / name
        if not path.is_file():
            raise IncompleteCheckpointError(f"checkpoint {folder} is missing {name}; {fix}")
        if name in listed and path.stat().st_size != listed[name]:
            raise IncompleteCheckpointError(
                f"checkpoint {folder}: {name} is {path.stat().st_size} bytes, {listed[name]} when written (truncated?); {fix}")
