"""JupyterLab on the tutorial's notebooks: started on 127.0.0.1 with a token, stopped with nothing left.

`ktutorial lab` (and `make lab`) runs `python -m jupyterlab` with notebooks/ as its folder, so a
reader runs each notebook by hand on its default parameters (the tiny profile). What the notebooks
write goes to the build folder (their `out_dir`, `../build` seen from notebooks/); what JupyterLab
keeps goes beside it, in build/lab/: checkpoints there, saves stripped of outputs
(`ktutorial.labcontents`), so notebooks/ stays as committed.

The token is JupyterLab's own: read from the server's runtime file (`jpserver-PID.json`, in
Jupyter's runtime folder), printed, never written by ktutorial. Stopping ends the model servers
the session's notebooks started (as `ktutorial tutorial` does after its run; 02_launch leaves one
for the notebooks after it), then JupyterLab, which shuts its kernels down; a kernel that
outlives it is killed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from ktutorial import server
from ktutorial.errors import MissingDependency, UserError
from ktutorial.layout import BUILD_DIR, repo_root

DEFAULT_PORT = 8888
READY_TIMEOUT_S = 120.0  # a first start on a loaded 2-core machine takes 10-30 s
STOP_GRACE_S = 30.0  # JupyterLab asks each kernel to shut down, waits, then kills it
# Set in JupyterLab's environment, so inherited by its kernels and the model servers they start:
# stopping the session finds those servers by it, even after their kernel has gone.
SESSION_ENV = "KTUTORIAL_LAB_SESSION"


def state_dir(root: Path | None = None) -> Path:
    """build/lab/: JupyterLab's checkpoints, outside notebooks/."""
    return (root or repo_root()) / BUILD_DIR / "lab"


def command(port: int, notebooks_dir: Path, lab_dir: Path, open_browser: bool = False) -> list[str]:
    """The JupyterLab command line: local only, notebooks/ as its folder, saves kept as stored."""
    return [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.root_dir={notebooks_dir}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # the printed URL is the port asked for, or a clear failure
        f"--ServerApp.open_browser={open_browser}",
        "--ServerApp.terminals_enabled=False",  # the notebooks need no shell in the browser
        "--ServerApp.allow_root=True",  # containers and CI run as root; Jupyter refuses it otherwise
        "--ServerApp.contents_manager_class=ktutorial.labcontents.StoredNotebooks",
        # Absolute: Jupyter joins it to the notebook's folder, which keeps an absolute path as is.
        f"--FileCheckpoints.checkpoint_dir={lab_dir / 'checkpoints'}",
        # Nothing fetched from the network: no news feed, no update check.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    ]


@dataclass
class Lab:
    """A running JupyterLab: its URL with the token, and how to stop it."""

    proc: subprocess.Popen
    port: int
    token: str
    session: str
    log_path: Path | None = None
    stopped_servers: list[dict] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/lab?token={self.token}"

    def notebook_url(self, name: str) -> str:
        return f"{self.base_url}/lab/tree/{name}.ipynb?token={self.token}"

    def api(self, method: str, route: str, **kwargs) -> httpx.Response:
        """A call to Jupyter's REST API (`/api/...`) with the token."""
        headers = {"Authorization": f"token {self.token}"}
        return httpx.request(method, f"{self.base_url}{route}", headers=headers, timeout=30, **kwargs)

    def stop(self, grace_s: float = STOP_GRACE_S) -> list[int]:
        """Stop the model servers this session's kernels started, then JupyterLab and its kernels.
        Returns the pids of processes that outlived JupyterLab's own shutdown and were killed."""
        self.stopped_servers = [e for e in server.running() if _session_of(e["pid"]) == self.session]
        for entry in self.stopped_servers:
            server.stop(entry)
        try:
            below = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            below = []
        # SIGTERM makes Jupyter shut its kernels down before it exits. Kernels run in sessions of
        # their own (jupyter_client), so the group signal reaches only the server itself.
        server.stop_process_group(self.proc.pid, grace_s, leader=self.proc)
        killed = []
        for proc in below:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    killed.append(proc.pid)
            except psutil.Error:
                continue
        return killed


def _session_of(pid: int) -> str | None:
    """The JupyterLab session whose kernel started process `pid` (the environment marks it)."""
    try:
        return psutil.Process(pid).environ().get(SESSION_ENV)
    except (psutil.Error, OSError):
        return None


def _runtime_file(pid: int, runtime_dir: Path) -> Path:
    return runtime_dir / f"jpserver-{pid}.json"


def _runtime_dir(env: dict) -> Path:
    """Where the Jupyter server started with `env` writes its jpserver-PID.json."""
    from jupyter_core.paths import jupyter_runtime_dir

    saved = os.environ.get("JUPYTER_RUNTIME_DIR")
    try:
        if env.get("JUPYTER_RUNTIME_DIR"):
            os.environ["JUPYTER_RUNTIME_DIR"] = env["JUPYTER_RUNTIME_DIR"]
        return Path(jupyter_runtime_dir())
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_RUNTIME_DIR", None)
        else:
            os.environ["JUPYTER_RUNTIME_DIR"] = saved


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return "(its output went to the terminal above)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start(
    port: int | None = None,
    open_browser: bool = False,
    log_path: Path | None = None,
    env: dict | None = None,
    root: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> Lab:
    """Start JupyterLab on notebooks/ and wait until its API answers. `port`: the one asked (a busy
    one is refused, naming its holder), else 8888 when free, else a free one. `log_path`: its
    output (default: this terminal). `env`: the server's environment (default: this one)."""
    if importlib.util.find_spec("jupyterlab") is None:
        raise MissingDependency("JupyterLab", "run `make setup` (it installs the `lab` extra: pip install -e '.[lab]')")
    root = root or repo_root()
    if port is None:
        try:
            server.check_port_free(DEFAULT_PORT)
            port = DEFAULT_PORT
        except UserError:
            port = server.free_port()
    else:
        server.check_port_free(port)
    lab_dir = state_dir(root)
    (lab_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    session = secrets.token_hex(8)
    env = {**(os.environ if env is None else env), SESSION_ENV: session}
    with open(log_path, "ab") if log_path else contextlib.nullcontext() as out:
        proc = subprocess.Popen(command(port, root / "notebooks", lab_dir, open_browser), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT if out else None, env=env,
                                start_new_session=True)  # Ctrl-C in the terminal reaches ktutorial, which stops it
    info_file = _runtime_file(proc.pid, _runtime_dir(env))
    deadline = time.monotonic() + timeout_s
    lab = None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(f"JupyterLab exited ({proc.returncode}) before it answered:\n{_tail(log_path)}")
            if lab is None and info_file.is_file():
                try:
                    info = json.loads(info_file.read_text())
                except json.JSONDecodeError:  # being written
                    info = None
                if info:
                    lab = Lab(proc, port, info["token"], session, log_path)
            if lab is not None:
                try:
                    if lab.api("GET", "/api/status").status_code == 200:
                        return lab
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        raise UserError(f"JupyterLab did not answer on port {port} within {timeout_s:.0f} s:\n{_tail(log_path)}")
    except BaseException:
        server.stop_process_group(proc.pid, 5.0, leader=proc)
        raise


def _interrupt(signum, frame):
    """SIGTERM (make or a service manager stopping `ktutorial lab`) stops it as Ctrl-C does."""
    raise KeyboardInterrupt


def run(port: int | None = None, open_browser: bool = True, say: Callable[[str], None] = print) -> Lab:
    """`ktutorial lab`: start JupyterLab, print its URL, wait for Ctrl-C (or SIGTERM), stop it."""
    lab = start(port=port, open_browser=open_browser)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        say(f"JupyterLab on notebooks/ (their parameters: the tiny profile), outputs in {BUILD_DIR}/:")
        say(f"  {lab.url}")
        say("Ctrl-C stops it, the model servers the notebooks started, and its kernels.")
        lab.proc.wait()
        say(f"JupyterLab exited ({lab.proc.returncode}).")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        killed = lab.stop()
        for entry in lab.stopped_servers:
            say(f"stopped the {entry['engine']} server the notebooks started (pid {entry['pid']})")
        if killed:
            say(f"killed {len(killed)} kernel process(es) that outlived JupyterLab: {killed}")
    return lab
