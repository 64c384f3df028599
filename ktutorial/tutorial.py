"""Runs the tutorial: the notebooks in `notebooks/`, executed with papermill under a profile.

The notebooks are stored without outputs; `run_tutorial()` executes copies into `OUT/notebooks/`
(papermill parameters `profile` and `out_dir`: nothing else differs between a reader's GPU machine
and CI), scrubs this machine's paths from them, and stops the servers they left running for the
profile. `ktutorial tutorial` then builds the site (`ktutorial.docs`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ktutorial import server
from ktutorial.errors import UserError
from ktutorial.layout import NOTEBOOKS, NOTEBOOKS_DIR, repo_root
from ktutorial.profiles import load_profile
from ktutorial.results import scrub

CELL_TIMEOUT_S = 600


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
    stopped_servers: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs)


def _errors(nb: dict):
    """(code cell number, cell, error output) for each error in an executed notebook, numbered
    as in the stored notebook: papermill's injected parameters cell is not counted."""
    code_index = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code" or "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        code_index += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                yield code_index, cell, out


def _failed_cell(output: Path) -> str:
    """Name the cell that failed in an executed notebook: its index and first source line."""
    try:
        nb = json.loads(output.read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown cell"
    for code_index, cell, out in _errors(nb):
        src = "".join(cell.get("source", "")).strip().splitlines()
        first = src[0] if src else ""
        evalue = str(out.get("evalue", "")).strip().splitlines()
        return f"code cell {code_index} ({first[:80]!r}): {out.get('ename')}: {evalue[0][:300] if evalue else ''}"
    return "unknown cell"


def error_cells(path: Path) -> list[str]:
    """Every error output of an executed notebook, as 'cell N: Name: message' lines."""
    nb = json.loads(Path(path).read_text())
    return [f"cell {i}: {out.get('ename')}: {str(out.get('evalue'))[:200]}" for i, _, out in _errors(nb)]


_TEXT_MIMES = ("text/plain", "text/markdown", "text/html", "application/json")


def scrub_text(text: str, root: str | None = None) -> str:
    """Text with this machine's paths and hostname replaced (~, $KTUTORIAL_HOME, <host>; the
    checkout becomes ".")."""
    root = str(repo_root()) if root is None else root
    text = scrub(text)
    return text.replace(root, ".") if root and len(root) > 1 else text


def scrub_executed(path: Path) -> None:
    """Remove this machine's paths (checkout, home, KTUTORIAL_HOME) and hostname from an executed
    notebook's text outputs and papermill metadata: the copies are published on the site."""
    root = str(repo_root())
    nb = json.loads(Path(path).read_text())

    def fix(value):
        if isinstance(value, str):
            return scrub_text(value, root)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    for cell in nb.get("cells", []):
        cell["source"] = fix(cell.get("source", ""))
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = fix(out["text"])
            if "traceback" in out:
                out["traceback"] = fix(out["traceback"])
            if "evalue" in out:
                out["evalue"] = fix(out["evalue"])
            data = out.get("data") or {}
            for mime in list(data):
                if mime in _TEXT_MIMES:  # images stay untouched: base64 may hold any letters
                    data[mime] = fix(data[mime])
    nb["metadata"] = fix(nb.get("metadata", {}))
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run_notebook(name: str, profile: str, out_dir: Path, extra: Optional[dict] = None) -> NotebookRun:
    """Execute one notebook into OUT/notebooks/NAME.ipynb (kernel working folder: OUT)."""
    import papermill  # the docs extra: only running the notebooks needs it

    src = repo_root() / "notebooks" / f"{name}.ipynb"
    if not src.is_file():
        raise UserError(f"notebook {src} not found; known notebooks: {', '.join(NOTEBOOKS)}")
    out_dir = Path(out_dir).resolve()
    nb_out = out_dir / NOTEBOOKS_DIR
    nb_out.mkdir(parents=True, exist_ok=True)
    output = nb_out / f"{name}.ipynb"
    # The kernel runs in OUT, so "." is the output folder: the injected parameters cell (published
    # on the site) shows no path of this machine.
    params = {"profile": profile, "out_dir": "."}
    params.update(extra or {})
    start = time.perf_counter()
    # The kernel process inherits this process's stderr: its start-up chatter (a warning about
    # TCP transport, native libraries' prints before the kernel captures them) goes to a log
    # beside the notebook instead of between the progress lines.
    log_path = nb_out / f"{name}.kernel.log"
    try:
        with _stderr_to(log_path):
            papermill.execute_notebook(
                str(src),
                str(output),
                parameters=params,
                kernel_name="python3",
                progress_bar=False,
                cwd=str(out_dir),
                execution_timeout=CELL_TIMEOUT_S,
            )
    except papermill.PapermillExecutionError:
        scrub_executed(output)
        raise UserError(
            f"notebook {name} failed in {_failed_cell(output)}; the executed copy with the "
            f"traceback is {output}"
        ) from None
    scrub_executed(output)
    return NotebookRun(name, time.perf_counter() - start, output)


@contextmanager
def _stderr_to(path: Path):
    """Point file descriptor 2 at `path` for the block (child processes inherit it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_tutorial(
    profile: str = "tiny",
    out_dir: str | Path = "build",
    only: Optional[list[str]] = None,
    progress: Optional[Callable] = None,
) -> TutorialResult:
    """Run every notebook in order (or `only` those) into OUT/notebooks.

    `progress(name, index, total, seconds_or_None)` is called before and after each notebook.
    Servers the notebooks left running for the profile are stopped at the end, failed or not.
    """
    load_profile(profile)  # fail before the first notebook on a bad profile name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(only or NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise UserError(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    names = [n for n in NOTEBOOKS if n in names]  # the tutorial's order, whatever the order asked
    result = TutorialResult(profile=profile, out_dir=out)
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
        result.stopped_servers = server.stop_profile_servers(profile)
    return result


def main_progress(console):
    """A progress printer for the CLI: one line a notebook with its time."""

    def show(name, index, total, seconds):
        if seconds is None:
            console.print(f"[{index + 1}/{total}] {name} ...", highlight=False)
        else:
            console.print(f"[{index + 1}/{total}] {name} done in {seconds:.1f} s", highlight=False)
        sys.stdout.flush()

    return show

