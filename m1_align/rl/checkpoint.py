"""Resumable state of the online loop: weights, optimiser states, loop state and every rank's RNG, written
atomically into `output_dir/checkpoint` and read back on resume."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m1_align.runs import atomic_replace_dir, check_complete, mark_complete

CHECKPOINT_DIR = "checkpoint"


def _save_rng(path: Path, rank: int) -> None:
    # JSON and a plain tensor, so resuming never needs to unpickle anything; one pair per process.
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    path.joinpath(f"rng_rank{rank}.json").write_text(
        json.dumps({"python": [version, list(state), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]})
    )
    torch.save(torch.get_rng_state(), path / f"torch_rng_rank{rank}.pt")


def _load_rng(path: Path, rank: int) -> None:
    saved = json.loads(path.joinpath(f"rng_rank{rank}.json").read_text())
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.load(path / f"torch_rng_rank{rank}.pt", weights_only=True))


def save_loop_state(
    output_dir: Path,
    step: int,
    models: dict[str, Any],
    optimizers: dict[str, Any],
    state: dict,
    rank: int = 0,
    world_size: int = 1,
    before_commit: Callable[[Path], None] | None = None,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Model weights (safetensors), optimiser states, loop state and every rank's RNG state, written into a
    temp folder and swapped in atomically by the main process once all ranks are done. `before_commit(tmp)`
    adds what every rank writes itself (DeepSpeed's partitioned states)."""
    final = output_dir / CHECKPOINT_DIR
    tmp = output_dir / f".{CHECKPOINT_DIR}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if rank == 0:
        for name, model in models.items():
            model.save_pretrained(str(tmp / name), safe_serialization=True)
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size, **state}, indent=2))
    _save_rng(tmp, rank)
    if before_commit is not None:
        before_commit(tmp)
    barrier()
    if rank == 0:
        mark_complete(tmp)
        atomic_replace_dir(tmp, final)
    barrier()


def load_loop_state(output_dir: Path, rank: int = 0) -> dict[str, Any] | None:
    """The loop state of the last checkpoint, or None; restores this rank's RNG state. Weights are loaded by the caller."""
    path = output_dir / CHECKPOINT_DIR
    if not path.is_dir():
        return None
    check_complete(path, ("state.json", "optimizers.pt"))  # never resume with a fresh optimizer unannounced
    state = json.loads((path / "state.json").read_text())
    if not (path / f"rng_rank{rank}.json").is_file():
        raise ValueError(f"{path} was written by {state.get('world_size', 1)} processes; resume it with as many, "
                         "or start over with overwrite=true")
    _load_rng(path, rank)
    return state


def load_optimizers(output_dir: Path, optimizers: dict[str, Any]) -> None:
    if not optimizers:
        return
    states = torch.load(output_dir / CHECKPOINT_DIR / "optimizers.pt", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])
