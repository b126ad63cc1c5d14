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
        atomic_write_json(Path(self.output_dir) / RESULT_FILE, asdict(self))

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


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Create output_dir; refuse to write over a finished run unless overwrite is set. Overwriting starts
    over: the finished run (checkpoints included) is removed, so nothing resumes from it. An unfinished
    run is left for the stage to resume. Under several processes rank 0 removes and the others wait."""
    out = Path(output_dir)
    if (out / RESULT_FILE).is_file():
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a finished run; choose another output_dir or pass overwrite=true"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, old)  # one rename: no process sees half of the old run
            shutil.rmtree(old, ignore_errors=True)
        else:
            deadline = time.time() + 600
            while (out / RESULT_FILE).is_file() and time.time() < deadline:
                time.sleep(0.2)
    out.mkdir(parents=True, exist_ok=True)
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
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
