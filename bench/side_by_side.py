"""Bench variants side by side: each runs in its own Python process (no memory or thread state carried
from one to the next) and prints one `RESULT {json}` line; optionally the same variant again with
m1_align imported from an older checkout (`--baseline-tree DIR`, e.g. `git worktree add --detach DIR
<commit>`), so before and after are measured in one sitting."""

import json
import os
import subprocess
import sys


def run_result(command: list[str]) -> tuple[dict | None, str]:
    """(the command's last RESULT object, or None when it failed or printed none; its stdout + stderr)."""
    done = subprocess.run(command, capture_output=True, text=True)
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return None, log
    return json.loads(lines[-1][len("RESULT "):]), log


def baseline_tree(parser, tree: str | None) -> str | None:
    """`--baseline-tree` checked: the absolute path of a checkout with an m1_align/ package, or None."""
    if tree is None:
        return None
    path = os.path.abspath(tree)
    if not os.path.isfile(os.path.join(path, "m1_align", "__init__.py")):
        parser.error(f"--baseline-tree {tree}: no m1_align/ there")
    return path


def from_tree(script: str, tree: str) -> str:
    """A `python -c` script that imports m1_align from `tree` instead of this checkout."""
    return f"import sys; sys.path.insert(0, {tree!r})\n" + script


def markdown_table(header: list[str], rows: list[tuple[str, list[str] | None]]) -> str:
    """Rows of (label, cells); None cells: the variant did not run."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, cells in rows:
        cells = cells if cells is not None else ["did not run"] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def failed(label: str, log: str) -> None:
    print(f"{label} did not run:\n{log[-2000:]}", file=sys.stderr)
