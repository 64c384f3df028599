"""Where the checkout keeps things: its root, the tutorial's notebooks in order, output folders.

A leaf module: the notebook runner, the site builder and the CLI all read the layout from here.
"""

from __future__ import annotations

from pathlib import Path

from ktutorial.errors import UserError

NOTEBOOKS = [
    "00_check_and_plan",
    "01_download",
    "02_launch",
    "03_requests",
    "04_tuning_sweeps",
    "05_claude_code",
    "06_llamacpp_comparison",
    "07_inside_kt",
]
# The checkout's output folder. Run by hand from notebooks/, the notebooks write into it
# (their `out_dir` is "../build"); `make tutorial` and `make lab` use it too.
BUILD_DIR = "build"
# Sub-folders of the output folder the notebooks write into.
RECORDS_DIR, FIGURES_DIR, NOTEBOOKS_DIR = "records", "figures", "notebooks"


def repo_root() -> Path:
    """The checkout holding notebooks/ (the package is installed editable from it)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    cwd = Path.cwd()
    if (cwd / "notebooks").is_dir():
        return cwd
    raise UserError("notebooks/ not found: run ktutorial tutorial from the ktutorial checkout")
