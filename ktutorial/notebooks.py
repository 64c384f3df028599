"""Run the tutorial's notebooks with papermill under a profile, then build the site.

Notebooks in `notebooks/` are stored without outputs; executing them writes copies into
`OUT/notebooks/`. Each gets the papermill parameters `profile` and `out_dir`; nothing else
differs between a reader's GPU machine and CI.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
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

# A cell that runs longer than this is stuck (a server that never answers), not slow.
CELL_TIMEOUT_S = 600


def repo_root() -> Path:
    """The checkout holding notebooks/ (the package is installed editable from it)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "notebooks").is_dir():
        return here
    cwd = Path.cwd()
    if (cwd / "notebooks").is_dir():
        return cwd
    raise UserError("notebooks/ not found: run ktutorial tutorial from the ktutorial checkout")


@dataclass
class NotebookRun:
    name: str
    seconds: float
    output: Path


@dataclass
class TutorialResult:
    profile: str
    out_dir: Path
    runs: list[NotebookRun] = field(default_factory=list)
    site_dir: Path | None = None

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)


def _failed_cell(output: Path) -> str:
    """Name the cell that failed in an executed notebook: its index and first source line."""
    try:
        nb = json.loads(output.read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown cell"
    code_index = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        code_index += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell.get("source", "")).strip().splitlines()
                first = src[0] if src else ""
                return f"code cell {code_index} ({first[:80]!r}): {out.get('ename')}: {out.get('evalue')}"
    return "unknown cell"


def run_notebook(name: str, profile: str, out_dir: Path, extra: dict | None = None) -> NotebookRun:
    import papermill

    src = repo_root() / "notebooks" / f"{name}.ipynb"
    if not src.is_file():
        raise UserError(f"notebook {src} not found; known notebooks: {', '.join(NOTEBOOKS)}")
    nb_out = out_dir / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    output = nb_out / f"{name}.ipynb"
    params = {"profile": profile, "out_dir": str(out_dir.resolve())}
    params.update(extra or {})
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(src),
            str(output),
            parameters=params,
            kernel_name="python3",
            progress_bar=False,
            cwd=str(out_dir),
            execution_timeout=CELL_TIMEOUT_S,
        )
    except papermill.PapermillExecutionError as exc:
        raise UserError(
            f"notebook {name} failed in {_failed_cell(output)}; the executed copy with the "
            f"traceback is {output}"
        ) from None
    return NotebookRun(name, time.perf_counter() - start, output)


def run_tutorial(
    profile: str = "tiny",
    out_dir: str | Path = "build",
    only: list[str] | None = None,
    build_site: bool = True,
    progress=None,
) -> TutorialResult:
    """Run every notebook in order, then (optionally) build the site from the executed copies.

    `progress(name, index, total, seconds_or_None)` is called before and after each notebook.
    Servers the notebooks leave running for the profile are stopped at the end.
    """
    from ktutorial.profiles import load_profile

    load_profile(profile)  # fail before the first notebook on a bad profile name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = only or NOTEBOOKS
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise UserError(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    result = TutorialResult(profile=profile, out_dir=out)
    # Notebooks' kernels must import this same ktutorial and find the same tools (claude).
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names), None)
            run = run_notebook(name, profile, out)
            result.runs.append(run)
            if progress:
                progress(name, i, len(names), run.seconds)
    finally:
        _stop_profile_servers(profile)
    if build_site:
        from ktutorial.docs import build_site as _build

        result.site_dir = _build(out)
    return result


def _stop_profile_servers(profile: str) -> None:
    """02_launch leaves a server running for the later notebooks; the tutorial ends it."""
    try:
        from ktutorial import server
    except ImportError:
        return
    for entry in server.running():
        if entry.get("profile") == profile:
            server.stop(entry)


def main_progress(console):
    """A progress printer for the CLI: one line a notebook with its time."""

    def show(name, index, total, seconds):
        if seconds is None:
            console.print(f"[{index + 1}/{total}] {name} ...", highlight=False)
        else:
            console.print(f"[{index + 1}/{total}] {name} done in {seconds:.1f} s", highlight=False)
        sys.stdout.flush()

    return show
