"""Where ktutorial keeps its files: generated models, run state, logs.

KTUTORIAL_HOME overrides the default (~/.cache/ktutorial); tests point it at a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def home() -> Path:
    return _made(Path(os.environ.get("KTUTORIAL_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ktutorial")))


def run_dir() -> Path:
    """Run-state files of servers started by ktutorial (one JSON per server)."""
    return _made(home() / "run")


def logs_dir() -> Path:
    return _made(home() / "logs")


def models_dir() -> Path:
    return _made(home() / "models")
