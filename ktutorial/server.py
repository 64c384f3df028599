"""One server lifecycle for every engine: start, wait until ready, log, diagnose, stop; never an orphan.

An engine module renders a command line (engines/sglang_kt.py for SGLang + KT, engines/llamacpp.py
for llama.cpp); this module runs it:

- in its own process group (start_new_session), so stopping it stops every process it spawned;
- on a free port of 127.0.0.1, or the one asked (a busy port is refused, naming its holder);
- with stdout and stderr in a log file under `paths.logs_dir()`;
- polling `/health`, then `/v1/models`, until ready or a timeout; if the process dies first, the
  error carries the log tail and the matching diagnosis (`ktutorial.diagnose`);
- recorded in a run-state JSON under `paths.run_dir()`, so `ktutorial stop [--all]` finds a server
  that a crashed notebook left behind (the pid is checked against its start time before any kill);
- stopped with SIGTERM to the group, then SIGKILL after a grace period; as a context manager and
  at interpreter exit (unless detached).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import httpx
import psutil

from ktutorial import paths, tiny
from ktutorial.diagnose import GPU_INSTALL, diagnose
from ktutorial.doctor import plan_for
from ktutorial.engines import llamacpp, sglang_kt
from ktutorial.engines.adapters import detect_engine
from ktutorial.engines.http import served_model
from ktutorial.errors import MissingDependency, UserError
from ktutorial.profiles import Profile, load_profile
from ktutorial.shell import command_line
from ktutorial.tables import Markdown, ShowsItself, table

HOST = "127.0.0.1"
LLAMACPP_READY_TIMEOUT_S = 120.0
# Loading 230 GB of FP8 weights from disk and building CUDA graphs takes minutes.
SGLANG_READY_TIMEOUT_S = 1800.0
STOP_GRACE_S = 10.0
NO_SERVER_MESSAGE = "no running server: start one with `ktutorial serve --profile tiny --detach`"
DEFAULT_PORTS = {"llamacpp": 8080, "sglang-kt": 30000}


class ServerStartError(UserError):
    """The server died or never became ready. Carries the log tail and the diagnoses."""

    def __init__(self, message: str, *, log_path: Optional[Path], log_tail: str, diagnoses: list, returncode=None):
        self.log_path = log_path
        self.log_tail = log_tail
        self.diagnoses = diagnoses
        self.returncode = returncode
        parts = [message]
        if diagnoses:
            parts.append("Diagnosis:")
            parts += [f"  - {d}" for d in diagnoses]
        if log_tail.strip():
            parts.append(f"Last lines of the log ({log_path}):")
            parts += ["  | " + line for line in log_tail.rstrip("\n").splitlines()]
        super().__init__("\n".join(parts))


@dataclass
class Launch:
    """Everything needed to start one server; `shell()` is the command a reader can copy."""

    engine: str  # "llamacpp" or "sglang-kt"
    command: list[str]
    model: str  # the served model name clients send
    port: int
    host: str = HOST
    env: dict[str, str] = field(default_factory=dict)  # added to the caller's environment
    profile: Optional[str] = None
    model_path: Optional[str] = None
    plan: Any = None  # the Plan an SGLang command came from (its numbers feed the diagnosis)
    ready_timeout_s: float = LLAMACPP_READY_TIMEOUT_S

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shell(self) -> str:
        """One line to copy; this interpreter shows as `python` (no path of this machine)."""
        return command_line(self.command, self.env)


# ---- ports --------------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_holder(port: int) -> Optional[str]:
    """Who listens on `port`, in words, if psutil can tell (other users' sockets may be hidden)."""
    for entry in running():
        if entry.get("port") == port:
            return (
                f"a ktutorial {entry['engine']} server (pid {entry['pid']}, profile {entry.get('profile')}); "
                "reuse it or stop it with `ktutorial stop`"
            )
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                proc = psutil.Process(conn.pid)
                cmd = " ".join(proc.cmdline()[:4])
                return f"pid {conn.pid} ({proc.name()}: {cmd})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return None


def check_port_free(port: int, host: str = HOST) -> None:
    """Raise UserError, naming the holder when known, if `port` cannot be bound."""
    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range: pick one from 1024 to 65535, or leave --port out")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too: a port in TIME_WAIT is free for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            holder = port_holder(port)
            who = f" by {holder}" if holder else ""
            raise UserError(
                f"port {port} on {host} is in use{who}: pick another with --port, or leave --port out "
                "to get a free one"
            ) from exc


# ---- run state ------------------------------------------------------------------------------------


def _state_path(pid: int) -> Path:
    return paths.run_dir() / f"server-{pid}.json"


def _identity(pid: int, create_time: Optional[float]) -> str:
    """"same" (pid is the process that started at `create_time`), "zombie" (same, but exited),
    "other" (the pid was reused by an unrelated process) or "gone"."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) >= 0.5:
            return "other"
        return "zombie" if proc.status() == psutil.STATUS_ZOMBIE else "same"
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.Error:
        return "other"


def _same_process(pid: int, create_time: Optional[float]) -> bool:
    """True if `pid` is alive (not a zombie) and is the process that started at `create_time`."""
    return _identity(pid, create_time) == "same"


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def stop_process_group(pgid: int, grace_s: float = STOP_GRACE_S, leader: Optional[subprocess.Popen] = None) -> bool:
    """SIGTERM process group `pgid`, wait up to `grace_s` for its members to exit, SIGKILL what
    remains and wait up to 5 s more. True when no member is left.

    `leader`, when it is our own child, is reaped while waiting (a zombie is no member, but should
    not linger). The group is signalled as a whole (killpg), so processes forked during the grace
    period are stopped too; members are counted with psutil, zombies left out.
    """

    def alive() -> bool:
        if leader is not None:
            leader.poll()
        return bool(_group_members(pgid))

    def wait_until_gone(timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # a member not ours to signal: it still counts while it lives
        if wait_until_gone(wait_s):
            return True
    return False


def _read_entries() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(paths.run_dir().glob("server-*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # half-written by a process killed mid-write: ignored, replaced by the next start
    return out


def _entry_alive(entry: dict) -> bool:
    who = _identity(entry.get("pid", -1), entry.get("create_time"))
    if who == "same":
        return True
    if who == "other":
        # Linux never hands out a pid still used as a process group id: our group is gone.
        return False
    # The leader exited, but processes it spawned may remain in its group (SGLang's schedulers).
    pgid = entry.get("pgid")
    return bool(pgid) and bool(_group_members(pgid))


def running(engine: Optional[str] = None, profile: Optional[str] = None) -> list[dict]:
    """Run-state entries of live servers, newest first; entries of dead ones are removed."""
    live = []
    for path, entry in _read_entries():
        if not _entry_alive(entry):
            path.unlink(missing_ok=True)
            continue
        if engine and entry.get("engine") != engine:
            continue
        if profile and entry.get("profile") != profile:
            continue
        live.append(entry)
    live.sort(key=lambda e: e.get("started_utc", ""), reverse=True)
    return live


def find_running(profile: str, engine: Optional[str] = None) -> Optional["Server"]:
    """A live server started for `profile` (e.g. by notebook 02), to reuse; None if there is none."""
    entries = running(engine=engine, profile=profile)
    return Server.attach(entries[0]) if entries else None


def current_server() -> "Server":
    """The most recently started live model server; UserError if none runs. Claude Code's proxy
    (engine "ccproxy") is not one: chat and bench go to the engine itself, not through an extra hop."""
    entries = [e for e in running() if e.get("engine") != "ccproxy"]
    if not entries:
        raise UserError(NO_SERVER_MESSAGE)
    return Server.attach(entries[0])


def current_base_url() -> str:
    return current_server().base_url


# ---- the server ----------------------------------------------------------------------------------

_live_servers: "set[Server]" = set()


@atexit.register
def _stop_at_exit() -> None:
    for server in list(_live_servers):
        try:
            server.stop()
        except Exception:  # at exit, keep stopping the others
            pass


def _exit_on_sigterm() -> None:
    """Python's default SIGTERM ends the process without running atexit, which would orphan
    the servers it started; turn SIGTERM into SystemExit so _stop_at_exit runs. Only where no
    one else has claimed the signal, and only from the main thread (signal's own rule)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _tail(path: Optional[Path], lines: int = 40) -> str:
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64 * 1024))
        text = fh.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Server(ShowsItself):
    """A running (or about to run) engine server. Use `serve(...)` to make one.

    `with serve("tiny") as server: ...` stops it on leaving the block (unless it was found
    running rather than started here); a server that is not detached is also stopped at
    interpreter exit. `stop()` stops any server, found or started.
    """

    def __init__(self, launch: Launch):
        self.launch = launch
        self.engine = launch.engine
        self.model = launch.model
        self.host = launch.host
        self.port = launch.port
        self.profile = launch.profile
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.pgid: Optional[int] = None
        self.create_time: Optional[float] = None
        self.log_path: Optional[Path] = None
        self.started_utc: Optional[str] = None
        self.detached = False
        self.owned = False  # started by this object (a `with` block stops only those)
        self._state_file: Optional[Path] = None

    # -- identity

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Server(engine={self.engine!r}, model={self.model!r}, base_url={self.base_url!r}, pid={self.pid})"

    def markdown(self) -> Markdown:
        return table({
            "engine": self.engine,
            "base URL": self.base_url,
            "model (served name)": self.model,
            "profile": self.profile,
            "pid (process group)": self.pid,
            "log": str(self.log_path) if self.log_path else None,
            "started here": bool(getattr(self, "owned", False)),
            "detached (outlives this notebook)": bool(getattr(self, "detached", False)),
        })

    def state(self) -> dict:
        return {
            "pid": self.pid,
            "pgid": self.pgid,
            "create_time": self.create_time,
            "engine": self.engine,
            "base_url": self.base_url,
            "host": self.host,
            "port": self.port,
            "model": self.model,
            "model_path": self.launch.model_path,
            "profile": self.profile,
            "log_path": str(self.log_path) if self.log_path else None,
            "started_utc": self.started_utc,
            "command": self.launch.command,
        }

    @classmethod
    def attach(cls, entry: dict) -> "Server":
        """A handle on a server another process started (from its run-state entry)."""
        launch = Launch(
            engine=entry["engine"],
            command=list(entry.get("command") or []),
            model=entry["model"],
            port=entry["port"],
            host=entry.get("host", HOST),
            profile=entry.get("profile"),
            model_path=entry.get("model_path"),
        )
        server = cls(launch)
        server.pid = entry["pid"]
        server.pgid = entry.get("pgid", entry["pid"])
        server.create_time = entry.get("create_time")
        server.log_path = Path(entry["log_path"]) if entry.get("log_path") else None
        server.started_utc = entry.get("started_utc")
        server.detached = True  # not ours to stop at exit
        server._state_file = _state_path(server.pid)
        return server

    # -- lifecycle

    def start(self, wait: bool = True) -> "Server":
        if self.pid is not None:
            raise UserError(f"{self!r} was already started")
        check_port_free(self.port, self.host)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.log_path = paths.logs_dir() / f"{self.engine}-{self.profile or 'custom'}-{stamp}-p{self.port}.log"
        env = {**os.environ, **self.launch.env}
        with open(self.log_path, "ab") as log:
            log.write(f"# ktutorial: {self.launch.shell()}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.launch.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: stop() reaches every child
                )
            except FileNotFoundError as exc:
                raise UserError(f"cannot start {self.engine}: {self.launch.command[0]!r} not found") from exc
        self.pid = self.pgid = self.proc.pid
        self.owned = True
        self.started_utc = _utc_now()
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = None
        _live_servers.add(self)
        _exit_on_sigterm()
        self._write_state()
        if wait:
            try:
                self.wait_ready(self.launch.ready_timeout_s)
            except BaseException:
                self.stop()
                raise
        return self

    def _write_state(self) -> None:
        self._state_file = _state_path(self.pid)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, self._state_file)

    def returncode(self) -> Optional[int]:
        return self.proc.poll() if self.proc is not None else None

    def is_alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return _same_process(self.pid, self.create_time)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def diagnoses(self, returncode: Optional[int] = None) -> list:
        text = _tail(self.log_path, 400)
        return diagnose(text, plan=self.launch.plan, returncode=returncode, command=self.launch.command)

    def _fail(self, message: str, returncode: Optional[int] = None) -> ServerStartError:
        return ServerStartError(
            message,
            log_path=self.log_path,
            log_tail=self.log_tail(),
            diagnoses=self.diagnoses(returncode),
            returncode=returncode,
        )

    def ready(self) -> bool:
        """One readiness probe: /health answers 200 and /v1/models lists a model."""
        timeout = httpx.Timeout(2.0, connect=1.0)
        try:
            with httpx.Client(timeout=timeout, trust_env=False) as http:
                if http.get(f"{self.base_url}/health").status_code != 200:
                    return False
                models = http.get(f"{self.base_url}/v1/models")
                return models.status_code == 200 and bool(models.json().get("data"))
        except (httpx.HTTPError, ValueError):
            return False

    def wait_ready(self, timeout_s: Optional[float] = None) -> "Server":
        timeout_s = self.launch.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        delay_s = 0.1
        while True:
            if not self.is_alive():
                rc = self.returncode()
                raise self._fail(
                    f"the {self.engine} server exited (code {rc}) before it was ready", returncode=rc
                )
            if self.ready():
                return self
            if time.monotonic() > deadline:
                error = self._fail(
                    f"the {self.engine} server was not ready within {timeout_s:g} s (pid {self.pid}); "
                    + ("it was stopped. " if self.owned else "")
                    + "Give it longer (ready_timeout_s / --ready-timeout) if it was still loading"
                )
                if self.owned:
                    self.stop()
                raise error
            time.sleep(delay_s)
            delay_s = min(delay_s * 1.5, 1.0)

    def detach(self) -> "Server":
        """Leave the server running after this interpreter exits (`ktutorial stop` ends it)."""
        self.detached = True
        _live_servers.discard(self)
        return self

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole process group, SIGKILL what remains after `grace_s`; idempotent."""
        _live_servers.discard(self)
        if self.pgid is None:
            return
        pgid = self.pgid
        if self.proc is None and _identity(self.pid, self.create_time) == "other":
            # The pid now belongs to an unrelated process (reused): not ours to signal.
            self._forget()
            return
        stop_process_group(pgid, grace_s, leader=self.proc)
        self._forget()

    def _forget(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if self._state_file is not None:
            self._state_file.unlink(missing_ok=True)

    def __enter__(self) -> "Server":
        if self.pid is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        # A server found running (reuse=True, find_running) was someone else's: leave it be.
        if self.owned:
            self.stop()


def stop_servers(all: bool = False, pid: Optional[int] = None, port: Optional[int] = None) -> list[dict]:
    """Stop the one running server (or the one with `pid`/`port`, or `all`); returns their entries."""
    entries = running()
    if pid is not None:
        entries = [e for e in entries if e["pid"] == pid]
    if port is not None:
        entries = [e for e in entries if e["port"] == port]
    if not entries:
        if pid is not None or port is not None:
            raise UserError(f"no running ktutorial server with {'pid ' + str(pid) if pid else 'port ' + str(port)}")
        return []
    if len(entries) > 1 and not all:
        listing = "; ".join(f"{e['engine']} pid {e['pid']} at {e['base_url']}" for e in entries)
        raise UserError(f"{len(entries)} servers are running ({listing}): pass --all, --pid or --port")
    for entry in entries:
        Server.attach(entry).stop()
    return entries


def stop(target: Union["Server", dict, None] = None) -> None:
    """Stop a server: a Server, a run-state entry (from `running()`), or the one running."""
    if target is None:
        stop_servers()
    elif isinstance(target, Server):
        target.stop()
    else:
        Server.attach(target).stop()


# ---- building a launch from a profile ----------------------------------------------------------


def _profile(obj) -> Any:
    if isinstance(obj, Profile):
        return obj
    return load_profile(str(obj))


def llamacpp_launch(
    model_path: Union[str, Path],
    served_name: str,
    port: Optional[int] = None,
    *,
    profile: Optional[str] = None,
    threads: int = 2,
    ctx_size: int = 4096,
    llama_server: Optional[str] = None,
    cpu_moe: bool = False,
    n_cpu_moe: Optional[int] = None,
    override_tensor: Optional[list[str]] = None,
    n_gpu_layers: Optional[int] = None,
    op_offload: bool = True,
    reasoning_format: str = "deepseek",
    parallel: int = 1,
    kv_unified: bool = False,
    ready_timeout_s: float = LLAMACPP_READY_TIMEOUT_S,
    dry_run: bool = False,
) -> Launch:
    """The Launch for llama.cpp serving one GGUF (xllamacpp child, or `llama_server`)."""
    binary = llamacpp.find_llama_server(llama_server) if llama_server else None
    if binary is None and not dry_run:
        llamacpp.require_xllamacpp()
    config = llamacpp.LlamaCppConfig(
        model_path=Path(model_path),
        port=port if port is not None else (DEFAULT_PORTS["llamacpp"] if dry_run else free_port()),
        threads=threads,
        ctx_size=ctx_size,
        alias=served_name,
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        override_tensor=list(override_tensor or []),
        n_gpu_layers=n_gpu_layers,
        op_offload=op_offload,
        reasoning_format=reasoning_format,
        parallel=parallel,
        kv_unified=kv_unified,
        binary=binary,
    )
    config.validate()
    env = config.environment()
    # llama.cpp's abort handler attaches gdb for a backtrace (slow, pages of noise): the
    # GGML_ASSERT line alone names the problem.
    env["GGML_NO_BACKTRACE"] = "1"
    return Launch(
        engine="llamacpp",
        command=config.command(),
        model=served_name,
        port=config.port,
        env=env,
        profile=profile,
        model_path=str(config.model_path),
        ready_timeout_s=ready_timeout_s,
    )


def sglang_launch(
    plan,
    port: Optional[int] = None,
    *,
    profile: Optional[str] = None,
    overrides: Optional[dict] = None,
    ready_timeout_s: float = SGLANG_READY_TIMEOUT_S,
    dry_run: bool = False,
    beyond_plan: bool = False,
) -> Launch:
    """The Launch for SGLang + KT from a Plan (engines/sglang_kt.py renders and validates it).

    `beyond_plan` launches settings the planner's estimate says do not fit: a tuned profile's
    measured values, or `ktutorial tune`'s probes looking for the real boundary."""
    overrides = dict(overrides or {})
    chosen_port = port if port is not None else (DEFAULT_PORTS["sglang-kt"] if dry_run else free_port())
    overrides.setdefault("host", HOST)
    overrides["port"] = chosen_port
    # Rendering validates: values sglang-kt's parser takes but that fail later are refused here.
    command = list(sglang_kt.render_command(plan, overrides, expand_paths=not dry_run, beyond_plan=beyond_plan))
    env = dict(sglang_kt.render_env(plan))
    served = _flag_value(command, "--served-model-name") or _flag_value(command, "--model-path") or "default"
    if not dry_run:
        if not getattr(plan, "fits", True) and not beyond_plan:
            raise UserError("the plan does not fit this machine: " + "; ".join(plan.reasons)
                            + " (`ktutorial plan` shows the numbers; --dry-run prints the command anyway)")
        model_path = _flag_value(command, "--model-path")
        if model_path and not Path(model_path).is_dir():
            raise UserError(f"model folder {model_path} not found: fetch it with "
                            f"`ktutorial download --model {plan.spec.name} --local-dir {model_path}`")

        if command[0] == sys.executable and importlib.util.find_spec("sglang") is None:
            raise MissingDependency(
                "sglang-kt (SGLang with KT-Kernel)",
                f"on the GPU machine: {GPU_INSTALL} (sglang-kt, kt-kernel and the wheels holding sgl_kernel's "
                "pieces, with their CUDA torch)",
            )
    return Launch(
        engine="sglang-kt",
        command=command,
        model=served,
        port=chosen_port,
        env=env,
        profile=profile,
        model_path=_flag_value(command, "--model-path"),
        plan=plan,
        ready_timeout_s=ready_timeout_s,
    )


def _flag_value(command: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def prepare(
    profile_or_plan="tiny",
    port: Optional[int] = None,
    *,
    dry_run: bool = False,
    plan=None,
    overrides: Optional[dict] = None,
    threads: Optional[int] = None,
    ctx_size: Optional[int] = None,
    llama_server: Optional[str] = None,
    cpu_moe: bool = False,
    n_cpu_moe: Optional[int] = None,
    override_tensor: Optional[list[str]] = None,
    n_gpu_layers: Optional[int] = None,
    op_offload: Optional[bool] = None,
    reasoning_format: str = "deepseek",
    parallel: Optional[int] = None,
    kv_unified: Optional[bool] = None,
    ready_timeout_s: Optional[float] = None,
    plan_options: Optional[dict] = None,
    beyond_plan: Optional[bool] = None,
) -> Launch:
    """The validated Launch for a profile (name, path or Profile) or a Plan, without starting it.

    Profile tiny: llama.cpp on `tiny.ensure(seed).gguf_path`, served as "ktutorial-tiny".
    An sglang-kt profile or a Plan: the SGLang + KT command from the plan; `plan_options` are
    `ktutorial plan`'s (gpu="RTX 5090:32", ram_gb=512, context_tokens=..., sets=[...]), or pass
    a ready `plan=`. `--set` values (plan_options["sets"]) win over the profile's `sglang:` block,
    and `overrides` over both. `beyond_plan` (default: whether the profile was written by
    `ktutorial tune`) launches where the planner's estimate says the settings do not fit.
    """
    if hasattr(profile_or_plan, "settings"):  # a Plan
        return sglang_launch(
            profile_or_plan,
            port,
            overrides=overrides,
            dry_run=dry_run,
            ready_timeout_s=ready_timeout_s or SGLANG_READY_TIMEOUT_S,
            beyond_plan=bool(beyond_plan),
        )
    prof = _profile(profile_or_plan)
    if prof.engine == "llamacpp" and plan_options:
        raise UserError(
            f"profile {prof.name!r} runs llama.cpp: the plan options ({', '.join(sorted(plan_options))}) apply to "
            "SGLang + KT profiles such as minimax-m2.1; llama.cpp takes --threads, --ctx-size, --cpu-moe, ..."
        )
    if prof.engine == "llamacpp":
        if prof.model == "tiny":
            model_path = tiny.ensure(prof.seed).gguf_path
        elif prof.model_dir:
            model_path = Path(os.path.expanduser(prof.model_dir))
        else:
            raise UserError(f"profile {prof.name!r} names no GGUF: set model_dir to a .gguf file")
        settings = prof.llamacpp or {}
        return llamacpp_launch(
            model_path,
            prof.served_model_name,
            port,
            profile=prof.name,
            threads=threads or int(settings.get("threads", 2)),
            ctx_size=ctx_size or int(settings.get("ctx_size", 4096)),
            llama_server=llama_server,
            cpu_moe=cpu_moe or bool(settings.get("cpu_moe", False)),
            n_cpu_moe=n_cpu_moe if n_cpu_moe is not None else settings.get("n_cpu_moe"),
            override_tensor=override_tensor or settings.get("override_tensor"),
            n_gpu_layers=n_gpu_layers if n_gpu_layers is not None else settings.get("n_gpu_layers"),
            op_offload=op_offload if op_offload is not None else bool(settings.get("op_offload", True)),
            reasoning_format=reasoning_format,
            parallel=parallel if parallel is not None else int(settings.get("parallel", 1)),
            kv_unified=kv_unified if kv_unified is not None else bool(settings.get("kv_unified", False)),
            ready_timeout_s=ready_timeout_s or LLAMACPP_READY_TIMEOUT_S,
            dry_run=dry_run,
        )
    if prof.engine == "sglang-kt":
        if plan is None:
            plan = plan_for_profile(prof, **(plan_options or {}))
        return sglang_launch(
            plan,
            port,
            profile=prof.name,
            overrides={**profile_flags(prof, plan), **(overrides or {})},
            dry_run=dry_run,
            ready_timeout_s=ready_timeout_s or SGLANG_READY_TIMEOUT_S,
            beyond_plan=bool(prof.tuned) if beyond_plan is None else beyond_plan,
        )
    raise UserError(f"profile {prof.name!r}: unknown engine {prof.engine!r} (llamacpp or sglang-kt)")


def profile_flags(prof, plan) -> dict[str, Any]:
    """The profile's `sglang:` flags, typed, less those the plan's `--set` values name: a flag set
    on the command line wins over the profile (the overrides re-plan on top of the `--set` ones)."""
    yours = set(sglang_kt.coerce_overrides(getattr(plan.goals, "overrides", None) or {}))
    return {k: v for k, v in sglang_kt.coerce_overrides(prof.sglang).items() if k not in yours}


HARDWARE_OPTIONS = ("gpu", "gpus", "ram_gb", "cpu_cores", "logical_cpus", "numa_nodes", "cpu_flags")


def plan_for_profile(prof, **plan_options):
    """The Plan for an sglang-kt profile, through `ktutorial plan`'s own option handling
    (`doctor.plan_for`): a machine described by the options (--gpu, --ram-gb, ...), else the
    profile's described_hardware, else this machine. The profile gives the model folder and
    the context goal unless the options do."""
    opts = {k: v for k, v in plan_options.items() if v is not None}
    opts.setdefault("model", prof.model)
    if prof.context_tokens:
        opts.setdefault("context_tokens", prof.context_tokens)
    if prof.described_hardware and not any(k in opts for k in HARDWARE_OPTIONS):
        opts.update(_described_options(prof.described_hardware))
    model_dir = opts.pop("model_dir", None) or (prof.model_dir if opts["model"] == prof.model else None)
    # The tiny's own folder only when the tiny is what is planned: notebooks plan MiniMax-M2.1 for a
    # tiny profile's machine too (`model="minimax-m2.1"`), from the shipped config.
    if opts["model"] == "tiny" and not model_dir:
        model_dir = str(tiny.ensure(prof.seed).hf_dir)
    present = bool(model_dir) and Path(os.path.expanduser(model_dir)).is_dir()
    plan = plan_for(model_dir=model_dir if present else None, **opts)
    if model_dir and not present:
        # Not downloaded yet (or not on this machine): plan from the shipped config, and still
        # point the command at the profile's folder (the goals too: a re-plan keeps it).
        plan.goals.model_dir = model_dir
        for flag in ("model-path", "kt-weight-path"):
            if flag in plan.settings:
                plan = plan.with_setting(flag, model_dir)
    return plan


def _described_options(described: dict) -> dict:
    """A profile's described_hardware as `ktutorial plan` options."""
    out: dict[str, Any] = {}
    gpus = described.get("gpus") or []
    if gpus:
        first = gpus[0]
        out["gpu"] = f"{first['name']}:{first.get('memory_gb', first.get('memory_gib'))}"
        out["gpus"] = int(described.get("gpu_count") or len(gpus))
    for key in ("ram_gb", "cpu_cores", "logical_cpus", "numa_nodes"):
        if described.get(key) is not None:
            out[key] = described[key]
    if described.get("cpu_flags"):
        out["cpu_flags"] = ",".join(described["cpu_flags"])
    return out


def serve(
    profile_or_plan="tiny",
    port: Optional[int] = None,
    *,
    detach: bool = False,
    reuse: bool = False,
    wait: bool = True,
    **options,
) -> Server:
    """Start a server for a profile or a Plan and wait until it answers; returns the Server.

    `reuse=True` returns a live server already started for the same profile (by notebook 02 or
    `ktutorial serve --detach`) instead of starting another. `detach=True` leaves it running
    after this interpreter exits. Other options go to `prepare()`.
    """
    if reuse and not hasattr(profile_or_plan, "settings"):
        name = _profile(profile_or_plan).name
        found = find_running(name)
        if found is not None:
            return found
    launch = prepare(profile_or_plan, port, **options)
    server = Server(launch)
    server.start(wait=wait)
    if detach:
        server.detach()
    return server


def stop_profile_servers(profile: str) -> list[dict]:
    """02_launch leaves a server running for the later notebooks; the tutorial ends it."""
    stopped = []
    for entry in running(profile=profile):
        stop(entry)
        stopped.append(entry)
    return stopped


# ---- which server a notebook uses: the reuse policy ------------------------------------------------


@dataclass
class Backend(ShowsItself):
    """The server a notebook talks to, and whether this notebook must stop it."""

    base_url: str
    model: str
    engine: str
    server: Any = None
    started_here: bool = False
    note: str = ""  # how it was found, for the reader

    def markdown(self) -> Markdown:
        return Markdown(self.note)


def backend_for(profile, base_url: Optional[str] = None) -> Backend:
    """A server for this notebook: the one at `base_url`, else one started for the profile (by
    02_launch or `ktutorial serve --detach`), else a new one that `release()` stops."""
    if base_url:
        url = base_url.rstrip("/").removesuffix("/v1")
        with httpx.Client(trust_env=False) as http:
            model = served_model(url, http)
        if model is None:
            raise UserError(f"no model listed at {url}/v1/models: start a server there, or leave base_url out")
        return Backend(url, model, detect_engine(url),
                       note=f"Using the server at {url} (model `{model}`), as the `base_url` parameter says.")
    found = find_running(profile.name)
    if found is not None:
        return Backend(found.base_url, found.model, found.engine, found, False,
                       note=f"Reusing the {found.engine} server that `02_launch` (or `ktutorial serve --detach`) left "
                            f"running for profile `{profile.name}` at {found.base_url} (model `{found.model}`).")
    started = serve(profile)
    return Backend(started.base_url, started.model, started.engine, started, True,
                   note=f"No server was running for profile `{profile.name}`: started {started.engine} at "
                        f"{started.base_url} (model `{started.model}`); this notebook stops it at its end.")


def release(backend: Backend) -> Markdown:
    """Stop the server if this notebook started it; leave one 02_launch started running. Says which."""
    if backend.started_here and backend.server is not None:
        backend.server.stop()
        return Markdown(f"Stopped the {backend.engine} server this notebook started.")
    return Markdown("The server stays running for the next notebooks (`ktutorial stop` ends it; "
                    "`ktutorial tutorial` stops it at the end).")
