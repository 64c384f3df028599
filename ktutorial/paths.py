"""Where ktutorial keeps its files: generated models, run state, logs.

KTUTORIAL_HOME overrides the default (~/.cache/ktutorial); tests point it at a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = os.environ.get("KTUTORIAL_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ktutorial"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir() -> Path:
    """Run-state files of servers started by ktutorial (one JSON per server)."""
    path = home() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    path = home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
