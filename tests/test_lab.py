"""The notebooks run by hand, and JupyterLab on them (`make lab`).

- Every notebook runs top to bottom through a real Jupyter kernel from notebooks/, with its own
  parameters (nbclient, nothing injected), in the tutorial's order as a reader would: no error, the
  server 02_launch leaves is reused by 03, 05 and 06, what they write lands in build/, and
  notebooks/ holds no new or changed file afterwards.
- `ktutorial lab` starts a real JupyterLab on 127.0.0.1 with a token; headless Chromium opens a
  notebook in it; a save (what autosave does) leaves notebooks/ as stored; stopping it leaves no
  process behind.
- Its contents manager stores notebooks without outputs, and writes nothing for a save that
  changes no source.

The by-hand run takes about as long as the tutorial (1-2 minutes on 2 cores) and writes into the
checkout's build/, as a reader's run does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chromium  # tests/chromium.py
import httpx
import nbformat
import psutil
import pytest

from ktutorial import lab, tutorial
from ktutorial.layout import BUILD_DIR, NOTEBOOKS

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden and git-ignored ones too, with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _git_status(folder: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", str(folder)],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout


def _shown(nb) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _marked(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has name=value (a kernel, a model server it started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(name) == value:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


# ---- saves keep notebooks/ as stored ----------------------------------------------------------


def test_saves_strip_outputs_and_leave_an_unchanged_notebook_alone(tmp_path):
    from ktutorial.labcontents import StoredNotebooks

    stored = (NB_DIR / "00_check_and_plan.ipynb").read_bytes()
    (tmp_path / "nb.ipynb").write_bytes(stored)
    before = (tmp_path / "nb.ipynb").stat().st_mtime_ns
    manager = StoredNotebooks(root_dir=str(tmp_path))

    # What JupyterLab sends after a run: outputs, counts, the kernel's language_info.
    run = nbformat.reads(stored.decode(), as_version=4)
    code = [c for c in run.cells if c.cell_type == "code"]
    code[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code[0].execution_count = 1
    run.metadata["language_info"] = {"name": "python", "version": "3.11.2", "mimetype": "text/x-python"}
    asyncio.run(manager.save({"type": "notebook", "format": "json", "content": run}, "nb.ipynb"))
    assert (tmp_path / "nb.ipynb").read_bytes() == stored
    assert (tmp_path / "nb.ipynb").stat().st_mtime_ns == before, "an unchanged notebook was rewritten"

    # A reader's edit is kept; the outputs are not.
    code[1].source = 'profile = "minimax-m2.1"'
    asyncio.run(manager.save({"type": "notebook", "format": "json", "content": run}, "nb.ipynb"))
    saved = nbformat.read(tmp_path / "nb.ipynb", as_version=4)
    saved_code = [c for c in saved.cells if c.cell_type == "code"]
    assert saved_code[1].source == 'profile = "minimax-m2.1"'
    assert all(c.outputs == [] and c.execution_count is None for c in saved_code)
    assert saved.metadata["language_info"] == {"name": "python"}


def test_lab_command_is_local_and_keeps_jupyter_state_outside_notebooks(tmp_path):
    command = lab.command(8888, NB_DIR, tmp_path / "lab")
    assert "--ServerApp.ip=127.0.0.1" in command and f"--ServerApp.root_dir={NB_DIR}" in command
    assert "--ServerApp.contents_manager_class=ktutorial.labcontents.StoredNotebooks" in command
    assert f"--FileCheckpoints.checkpoint_dir={tmp_path / 'lab' / 'checkpoints'}" in command
    assert not any("token" in arg.lower() for arg in command), "the token must not be on the command line"


def test_lab_refuses_a_busy_port(tmp_path):
    import socket

    from ktutorial.errors import UserError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(UserError, match="in use"):
            lab.start(port=sock.getsockname()[1], root=tmp_path)


# ---- every notebook by hand, from its folder --------------------------------------------------


@pytest.mark.slow
def test_every_notebook_runs_by_hand_from_its_folder():
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from ktutorial import server

    snapshot, status = _snapshot(NB_DIR), _git_status(NB_DIR)
    start = time.time()
    shown = {}
    try:
        for name in NOTEBOOKS:
            nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
            client = NotebookClient(nb, timeout=tutorial.CELL_TIMEOUT_S, kernel_name="python3",
                                    resources={"metadata": {"path": str(NB_DIR)}})
            try:
                client.execute()
            except CellExecutionError as exc:
                pytest.fail(f"{name}, run by hand from notebooks/, failed: {str(exc)[-1500:]}")
            shown[name] = _shown(nb)
    finally:
        stopped = server.stop_profile_servers("tiny")
    # 02_launch left its server for the notebooks after it, which reused it, as under papermill.
    assert [e["engine"] for e in stopped] == ["llamacpp"]
    for name in ("03_requests", "05_claude_code", "06_llamacpp_comparison"):
        assert "Reusing the llamacpp server that `02_launch`" in shown[name], name
    assert not any("No server was running" in text for text in shown.values())
    assert server.running() == []
    # What they wrote is in the checkout's build folder (out_dir = "../build"), made by this run.
    build = REPO / BUILD_DIR
    for rel in ("records/agreement.jsonl", "records/bench-tiny.jsonl", "records/sweep-tiny.jsonl",
                "figures/plan_memory.png", "figures/token_times.png", "routing/routing.png", "logs/kt-kernel.log"):
        assert (build / rel).is_file() and (build / rel).stat().st_mtime >= start - 1, rel
    # the download notebook fetches into build/models and, run again, keeps what is already there
    assert (build / "models/tiny-hf/config.json").is_file()
    # ...and nothing beside the notebooks: no output, log, checkpoint or cache.
    assert _snapshot(NB_DIR) == snapshot
    assert _git_status(NB_DIR) == status


# ---- JupyterLab, as `make lab` starts it -------------------------------------------------------


def _read_lines(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.slow
def test_make_lab_serves_the_notebooks_to_a_browser_and_stops_clean(tmp_path):
    jupyter_dirs = {k: str(tmp_path / v) for k, v in
                    (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"))}
    env = {**os.environ, **jupyter_dirs, "PYTHONUNBUFFERED": "1"}
    snapshot, status = _snapshot(NB_DIR), _git_status(NB_DIR)
    stored = (NB_DIR / "00_check_and_plan.ipynb").read_bytes()
    with open(tmp_path / "jupyter.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "ktutorial", "lab", "--no-browser"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue[str] = queue.Queue()
    session = None
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    url = None
    try:
        deadline = time.monotonic() + lab.READY_TIMEOUT_S + 10
        printed = ""
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                printed += lines.get(timeout=1)
            except queue.Empty:
                continue
            found = re.search(r"http://127\.0\.0\.1:(\d+)/lab\?token=(\w+)", printed)
            url = found and found.group(0)
        assert url, f"no URL printed: {printed!r}; JupyterLab's log: {(tmp_path / 'jupyter.log').read_text()[-2000:]}"
        base, token = url.split("/lab?token=")
        assert httpx.get(f"{base}/api/contents").status_code == 403, "the API answers without the token"

        # A reader opens a notebook: JupyterLab renders its heading and its parameters cell.
        dom = chromium.dump_dom(f"{base}/lab/tree/00_check_and_plan.ipynb?token={token}", budget_ms=8000)
        text = re.sub(r"<[^>]+>", "", dom).replace("&quot;", '"')
        assert "0 · Check the machine, plan the launch" in text, "the notebook's heading did not render"
        assert 'out_dir = "../build"' in text and "jp-Notebook" in dom, "the notebook's cells did not render"

        # Autosave after a run: the notebook, outputs and all, comes back; notebooks/ does not change.
        auth = {"Authorization": f"token {token}"}
        model = httpx.get(f"{base}/api/contents/00_check_and_plan.ipynb", headers=auth).json()
        cell = next(c for c in model["content"]["cells"] if c["cell_type"] == "code")
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "ran\n"}]
        cell["execution_count"] = 1
        saved = httpx.put(f"{base}/api/contents/00_check_and_plan.ipynb", headers=auth,
                          json={"type": "notebook", "format": "json", "content": model["content"]})
        assert saved.status_code == 200, saved.text
        assert (NB_DIR / "00_check_and_plan.ipynb").read_bytes() == stored
        kernels = httpx.get(f"{base}/api/kernels", headers=auth).json()
        assert kernels, "opening the notebook started no kernel"

        # 02_launch, run in this JupyterLab, leaves a detached server (its kernel's environment
        # carries the session's mark): stopping the lab must stop it too.
        jupyter = psutil.Process(proc.pid).children()[0]
        session = jupyter.environ()[lab.SESSION_ENV]
        served = subprocess.run(
            [sys.executable, "-c", ("from ktutorial import profiles, server; "
                                    "print(server.serve(profiles.load_profile('tiny'), detach=True).pid)")],
            check=False, env={**env, lab.SESSION_ENV: session}, capture_output=True, text=True, timeout=300)
        assert served.returncode == 0, served.stderr[-1500:]
        assert _marked(lab.SESSION_ENV, session), "the served model carries no session mark"
    finally:
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C or make's end does
        proc.wait(timeout=lab.STOP_GRACE_S + 30)
        if (NB_DIR / "00_check_and_plan.ipynb").read_bytes() != stored:
            (NB_DIR / "00_check_and_plan.ipynb").write_bytes(stored)  # leave the checkout as found
    output = "".join(lines.queue)
    assert proc.returncode == 0, output
    assert "killed" not in output, f"a kernel outlived JupyterLab: {output}"
    assert "stopped the llamacpp server the notebooks started" in output, output
    assert _marked(lab.SESSION_ENV, session) == [], "a model server or kernel of the session is left"
    # Nothing left: no JupyterLab, no kernel (both carry the session's mark), and JupyterLab's
    # checkpoints went to build/lab, not beside the notebooks.
    assert _marked("JUPYTER_RUNTIME_DIR", jupyter_dirs["JUPYTER_RUNTIME_DIR"]) == []
    assert list((REPO / BUILD_DIR / "lab" / "checkpoints").glob("00_check_and_plan-checkpoint.ipynb"))
    assert _snapshot(NB_DIR) == snapshot
    assert _git_status(NB_DIR) == status
