"""What a notebook cell calls that is not a result type: open a profile, pick the server, show a
command or a refusal, end with the environment stamp.

Result types show themselves (`_repr_markdown_`); the sentences about results are computed in
`ktutorial.report` and the figures drawn in `ktutorial.plots`. What is left here are the steps of a
notebook session that both do something and tell the reader what they did (`say`). The runner
that executes the notebooks is `ktutorial.tutorial`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ktutorial import bench, claude_code, diagnose, download, server, tiny
from ktutorial.download import public_url, resolve_endpoint, token_status
from ktutorial.engines import sglang_kt
from ktutorial.errors import MissingDependency, UserError
from ktutorial.hubserver import LocalHub
from ktutorial.layout import FIGURES_DIR, NOTEBOOKS, NOTEBOOKS_DIR, RECORDS_DIR, repo_root  # noqa: F401 (re-exported)
from ktutorial.profiles import load_profile
from ktutorial.report import load_published
from ktutorial.results import environment_stamp
from ktutorial.server import Backend, Launch
from ktutorial.shell import command_line
from ktutorial.tables import Markdown, table
from ktutorial.tutorial import scrub_text

# huggingface_hub imports tqdm.auto, which warns in a kernel without ipywidgets; downloads here
# run with progress=False, so the warning says nothing useful.
warnings.filterwarnings("ignore", message="IProgress not found")


def say(obj: Any) -> None:
    """Show `obj` where the reader is: a notebook displays it (the object renders itself, text is
    markdown), a script or test gets its markdown printed."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # IPython: present in a notebook kernel only
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(obj if hasattr(obj, "_repr_markdown_") else Markdown(str(obj)))
    else:
        print(obj.markdown() if hasattr(obj, "markdown") else obj)


def server_for(profile, base_url: Optional[str] = None) -> Backend:
    """The server this notebook uses (server.backend_for: the one at base_url, the one 02_launch left
    running, or a new one this notebook stops); says which."""
    backend = server.backend_for(profile, base_url)
    say(backend)
    return backend


def release(backend: Backend) -> None:
    say(server.release(backend))


@contextmanager
def quiet_native_output(log_name: str = "native-output.log", out_dir: str | Path = "."):
    """Send what a library prints during the block — native code writing to file descriptors 1
    and 2 (kt-kernel's C++ load messages) and Python prints (its loaders') — to OUT/logs/LOG_NAME
    instead of the notebook. Results are shown by the cells after it."""
    log_dir = Path(out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_dir / log_name, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield log_dir / log_name
        finally:
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def scrubbed(text: str) -> str:
    """Text with this machine's paths and hostname replaced (~, $KTUTORIAL_HOME, <host>, .)."""
    return scrub_text(str(text))


def show_command(command: Any, env: Optional[dict] = None) -> None:
    """A launch command as a shell block, one flag a line, no path of this machine."""
    if isinstance(command, Launch):
        env = command.env if env is None else env
        command = command.command
    say("```bash\n" + scrubbed(command_line(command, env, one_flag_a_line=True)) + "\n```")


def figures_dir(out_dir: str | Path = ".") -> Path:
    path = Path(out_dir) / FIGURES_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def records_path(out_dir: str | Path, name: str, fresh: bool = True) -> Path:
    """OUT/records/NAME.jsonl; `fresh` removes what an earlier run of the notebook wrote there."""
    path = Path(out_dir) / RECORDS_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        path.unlink(missing_ok=True)
    return path


def committed_records() -> Path:
    """results/: the records measured on the GPU device host, committed with the code."""
    return repo_root() / "results"


STAMP_KEYS = (
    "time_utc", "ktutorial_version", "git_sha", "python", "torch_version", "transformers_version",
    "kt_kernel_version", "kt_kernel_variant", "xllamacpp_version", "sglang_version", "engine", "engine_version",
    "model", "gpus", "gpu_driver", "cpu_model", "cpu_physical_cores", "cpu_logical", "numa_nodes", "ram_gb", "os",
)


def stamp(engine: Optional[str] = None, model: Optional[str] = None, extra: Optional[dict] = None) -> dict:
    """Show and return the environment stamp (versions, hardware, date) that ends every notebook."""
    env = environment_stamp(engine=engine, model=model, extra=extra)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    env = {"time_utc": now, **env}
    gpus = env.get("gpus") or []
    shown = {k: env.get(k) for k in STAMP_KEYS if k in env}
    shown["gpus"] = ", ".join(str(g.get("name")) for g in gpus) if gpus else "none"
    say("**Environment stamp** (what produced the outputs above)\n\n" + table(shown))
    return env


# =============================================================================================
# 00 check and plan
# =============================================================================================


def open_profile(profile: str):
    """Load a profile and show what it runs."""
    prof = load_profile(profile)
    facts = {
        "profile": prof.name,
        "model served": f"{prof.model} as {prof.served_model_name!r}",
        "engine": prof.engine,
        "SGLang started": "yes" if prof.start_sglang else "no: its commands are rendered and validated, not started",
        "bench input lengths": prof.bench.input_lens,
        "bench output tokens": prof.bench.output_len,
        "sweep spec": prof.sweep_spec,
    }
    if prof.described_hardware:
        hw = prof.described_hardware
        gpus = hw.get("gpus") or []
        facts["SGLang planned for"] = (
            f"{hw.get('gpu_count', len(gpus))} x {gpus[0]['name']} ({gpus[0].get('memory_gb')} GB), "
            f"{hw.get('cpu_cores')} cores, {hw.get('numa_nodes')} NUMA node(s), {hw.get('ram_gb')} GB RAM (described)"
            if gpus else str(hw)
        )
    else:
        facts["SGLang planned for"] = "this machine"
    say(f"{prof.description}\n\n" + table(facts))
    return prof


def try_settings(plan, overrides: dict) -> None:
    """Render the plan's command with `overrides`; show whether ktutorial refuses it and why."""
    shown = ", ".join(f"--{k.lstrip('-')} {v}" for k, v in overrides.items())
    try:
        sglang_kt.render_command(plan, overrides)
    except UserError as exc:
        message = str(exc)
        say(f"`{shown}` → **refused before launch**:\n\n```text\n{message}\n```")
        return
    say(f"`{shown}` → accepted")


# =============================================================================================
# 01 download
# =============================================================================================


@dataclass
class ModelSource:
    """Where a profile's checkpoint comes from: the hub, or for the tiny profile a local stand-in."""

    repo_id: str
    revision: str
    endpoint: Optional[str]  # None: HF_ENDPOINT or huggingface.co
    local_dir: Path
    note: str
    hub: Any = None  # the LocalHub serving the tiny checkpoint

    def facts(self) -> dict:
        return {
            "repo": self.repo_id,
            "revision": self.revision,
            "endpoint": public_url(resolve_endpoint(self.endpoint)),
            "into": scrubbed(self.local_dir),
            "HF_TOKEN": token_status(),
            "source": self.note,
        }

    def close(self) -> None:
        if self.hub is not None:
            self.hub.stop()
            self.hub = None


TINY_REPO = "ktutorial/tiny-minimax-m2"


def model_source(profile, model_dir: Optional[str] = None, out_dir: str | Path = ".") -> ModelSource:
    """The repo a profile downloads. Tiny: its generated FP8 folder served as TINY_REPO by
    ktutorial.hubserver on 127.0.0.1 (the real huggingface_hub client, offline); a known model:
    its hub repo at the pinned revision."""
    if profile.model == "tiny":
        hub = LocalHub.serving(TINY_REPO, tiny.ensure(profile.seed).hf_dir)
        local = Path(model_dir or Path(out_dir) / "models" / "tiny-hf")
        source = ModelSource(TINY_REPO, "main", hub.endpoint, local,
                             "the tiny model's FP8 folder, served on 127.0.0.1 by ktutorial's stand-in for the hub",
                             hub=hub)
    else:
        repo, revision = download.repo_for_model(profile.model)
        local = Path(os.path.expanduser(model_dir or profile.model_dir or f"~/models/{profile.model}"))
        source = ModelSource(repo, revision, None, local, "the Hugging Face hub")
    say(table(source.facts()))
    return source


# =============================================================================================
# 02 launch
# =============================================================================================


def sglang_status(profile, srv=None, planned_model: str = "minimax-m2.1") -> None:
    """What the profile started: the command above (the plan's), or, for a profile serving another
    model than the one planned above (tiny-sglang serves the tiny), the command that runs."""
    if profile.start_sglang and (profile.model == planned_model or srv is None or not srv.launch.command):
        say(f"Profile `{profile.name}`: **SGLang + KT is started** with the command above.")
    elif profile.start_sglang:
        say(f"Profile `{profile.name}`: **SGLang + KT is started** for the profile's own model "
                  f"(`{profile.model}`, served as `{srv.model}`); the command above is {planned_model}'s for "
                  "this machine. What runs:")
        show_command(srv.launch.command)
    else:
        say(
            f"Profile `{profile.name}`: **SGLang is not started here** (the profile says `start_sglang: false`): "
            "its command was rendered for the machine the profile describes and validated by ktutorial's checks "
            "and sglang-kt's own argument parser. The server this notebook starts is llama.cpp on the tiny model; "
            "the SGLang command is the one to run on your GPU machine (`ktutorial serve --profile minimax-m2.1`)."
        )


def parser_check(command: Sequence[str]) -> None:
    """Run sglang-kt 0.7.2's own argument parser over a rendered command and say what it made of it."""
    # No fallback: without sglang-kt's parser (make sglang-parser-env; on a GPU machine sglang-kt
    # itself) the notebook fails, naming the fix, rather than claim a check it did not make.
    got = sglang_kt.check_with_real_parser([command])
    res = got["results"][0]
    if not res["ok"]:
        raise UserError(f"sglang-kt's parser refused the command: {res.get('error')}")
    values, options = res["values"], got["flags"]
    rows = []
    for arg in command:
        if arg.startswith("--") and arg in options:
            dest = options[arg]["dest"]
            rows.append({"flag": f"`{arg}`", "sglang-kt's field": dest, "parsed as": repr(values.get(dest))})
    say(f"sglang-kt's own parser (`ServerArgs.add_cli_args`, the pinned version) accepted the command. "
              f"How it read each of the {len(rows)} flags:\n\n" + table(rows))


def kt_cli_defaults(plan) -> dict:
    """What kt-cli 0.7.2's `kt run` picks without a terminal (AMXINT4, 1 GPU expert), and its older
    M2.1 default for GPU experts (TP × (VRAM GB − 16)), for this plan's machine (FACTS)."""
    tp = int(plan.settings["tensor-parallel-size"].value) if "tensor-parallel-size" in plan.settings else 1
    vram_gb = plan.hardware.gpu_memory_gib
    older = max(0, int(tp * (vram_gb - 16)))
    got = {"no terminal": {"kt-method": "AMXINT4", "kt-num-gpu-experts": 1},
           "older M2.1 default": {"kt-num-gpu-experts": older}}
    say(table([{"kt run": k, "sets": ", ".join(f"--{f} {v}" for f, v in d.items())} for k, d in got.items()])
              + f"\n\n(TP {tp} × ({vram_gb:g} − 16) = {older} GPU experts on this plan's card.)")
    return got


def expect_refusal(fn: Callable, *args, **kwargs) -> None:
    """Call something that must be refused (a busy port, a bad value); show the message.
    Raises if it was not refused: the notebook would then be showing something untrue."""
    try:
        fn(*args, **kwargs)
    except UserError as exc:
        message = scrubbed(str(exc))
        say(f"Refused, with the fix named:\n\n```text\n{message}\n```")
        return
    raise AssertionError(f"{getattr(fn, '__name__', fn)} was expected to refuse, and did not")


def diagnosis_example(pattern_id: str, plan=None, command: Optional[Sequence[str]] = None) -> None:
    """What ktutorial says when a launch fails: the catalog's log line for `pattern_id`, diagnosed
    with this plan's numbers."""
    pattern = next((p for p in diagnose.catalog() if p.id == pattern_id), None)
    if pattern is None or not pattern.example:
        raise UserError(f"no diagnosis example {pattern_id!r}; ids: {', '.join(p.id for p in diagnose.catalog())}")
    found = diagnose.diagnose(pattern.example, plan=plan, command=list(command) if command else None)
    body = "\n".join(f"- **{d.title}.** {d.cause} **Fix:** {d.fix}" for d in found)
    say(f"A log line such as\n\n```text\n{pattern.example}\n```\n\nis diagnosed as:\n\n{body}")


# =============================================================================================
# 03 requests and every notebook that needs a server
# =============================================================================================


def printer() -> Callable[[str, str], None]:
    """on_delta for a streamed chat: reasoning in brackets, the answer as it arrives."""
    state = {"kind": None}

    def on_delta(kind: str, text: str) -> None:
        if kind != state["kind"]:
            print("\n[reasoning] " if kind == "reasoning" else "\n[answer] ", end="")
            state["kind"] = kind
        print(text, end="", flush=True)

    return on_delta


def echo_only(command: str) -> str:
    """A Bash tool handler that runs nothing but `echo`: the model's command is data, and a
    notebook must not run whatever a model writes."""
    args = shlex.split(command)
    if not args or args[0] != "echo" or any(c in command for c in ";|&$`<>"):
        return f"refused: this handler runs only plain `echo` commands, not {command!r}"
    return " ".join(args[1:]) + "\n"


# =============================================================================================
# 04 sweeps and 06 comparison: observations computed from records
# =============================================================================================


def sweep_spec(profile, spec: Optional[str] = None, input_lens: Optional[Sequence[int]] = None,
               output_len: Optional[int] = None, repeats: Optional[int] = None):
    """The profile's sweep spec (or `spec`), with bench parameters overridden where given."""
    loaded = bench.load_sweep(spec or profile.sweep_spec)
    for key, value in (("input_lens", input_lens), ("output_len", output_len), ("repeats", repeats)):
        if value is not None:
            loaded.bench[key] = list(value) if key == "input_lens" else int(value)
    combos = loaded.plan()
    say(f"Sweep `{loaded.name}` (profile `{loaded.profile}`): {loaded.description}\n\n"
              f"{len(combos)} serve combination(s) × bench {json.dumps(loaded.bench)}")
    return loaded


def published_for(profile) -> Optional[dict]:
    """The published figures when the profile serves the model they were measured on, else None
    (drawing MiniMax-M2.1's figures beside the tiny model's would compare nothing)."""
    return load_published() if profile.model == "minimax-m2.1" else None


# =============================================================================================
# 05 Claude Code
# =============================================================================================


def claude_turn(prompt: str, backend: Backend, timeout_s: float = 120, **kwargs):
    """One real `claude -p` turn against the backend; without the CLI, say how to install it."""
    try:
        result = claude_code.run(prompt, backend.base_url, backend.model, timeout_s=timeout_s, **kwargs)
    except MissingDependency as exc:
        say(f"Claude Code is not installed here: {exc}")
        return None
    calls = [{"tool": c["name"], "input": c["input"], "output": str(c["output"])[:200], "error": c["is_error"]}
             for c in result.tool_calls]
    say(table({"Claude Code": result.claude_version, "turns": result.num_turns, "wall s": result.wall_s,
                     "stop reason": result.stop_reason, "its answer": result.result})
              + ("\n\nTools it ran:\n\n" + table(calls) if calls else "\n\nIt ran no tool."))
    return result


# =============================================================================================
# 07 inside KT
# =============================================================================================
