"""The tutorial's notebooks: running them with papermill under a profile, and what they call.

Running: notebooks in `notebooks/` are stored without outputs; `run_tutorial()` executes copies
into `OUT/notebooks/` (papermill parameters `profile` and `out_dir`; nothing else differs
between a reader's GPU machine and CI) and stops the servers they left running for the profile;
`ktutorial tutorial` then builds the site (`ktutorial.docs`).

Inside a notebook: the notebooks stay thin (one library call a cell); the helpers below turn
library results into tables, charts and sentences. Every number they print comes from a
library call or a record, never from typed text.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import contextmanager
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ktutorial.errors import MissingDependency, UserError
from ktutorial.layout import FIGURES_DIR, NOTEBOOKS, NOTEBOOKS_DIR, RECORDS_DIR, repo_root  # noqa: F401 (re-exported)
from ktutorial.shell import command_line


# huggingface_hub imports tqdm.auto, which warns in a kernel without ipywidgets; downloads here
# run with progress=False, so the warning says nothing useful.
warnings.filterwarnings("ignore", message="IProgress not found")

# A cell that runs longer than this is stuck (a server that never answers), not slow.
CELL_TIMEOUT_S = 600


# =============================================================================================
# Running the tutorial
# =============================================================================================


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


def _scrub_text(text: str, root: str) -> str:
    from ktutorial.results import scrub

    text = scrub(text)
    return text.replace(root, ".") if root and len(root) > 1 else text


def scrub_executed(path: Path) -> None:
    """Remove this machine's paths (checkout, home, KTUTORIAL_HOME) and hostname from an executed
    notebook's text outputs and papermill metadata: the copies are published on the site."""
    root = str(repo_root())
    nb = json.loads(Path(path).read_text())

    def fix(value):
        if isinstance(value, str):
            return _scrub_text(value, root)
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
    import papermill

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


@contextmanager
def quiet_native_output(log_name: str = "native-output.log", out_dir: str | Path = "."):
    """Send what a library prints during the block — native code writing to file descriptors 1
    and 2 (kt-kernel's C++ load messages) and Python prints (its loaders') — to OUT/logs/LOG_NAME
    instead of the notebook. Results are shown by the cells after it."""
    import contextlib

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
    from ktutorial.profiles import load_profile

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
        result.stopped_servers = stop_profile_servers(profile)
    return result


def stop_profile_servers(profile: str) -> list[dict]:
    """02_launch leaves a server running for the later notebooks; the tutorial ends it."""
    from ktutorial import server

    stopped = []
    for entry in server.running(profile=profile):
        server.stop(entry)
        stopped.append(entry)
    return stopped


def main_progress(console):
    """A progress printer for the CLI: one line a notebook with its time."""

    def show(name, index, total, seconds):
        if seconds is None:
            console.print(f"[{index + 1}/{total}] {name} ...", highlight=False)
        else:
            console.print(f"[{index + 1}/{total}] {name} done in {seconds:.1f} s", highlight=False)
        sys.stdout.flush()

    return show


# =============================================================================================
# What the notebooks call: display
# =============================================================================================


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def _display(obj) -> None:
    if not _in_kernel():  # scripts and tests: plain text
        print(getattr(obj, "data", None) or getattr(obj, "filename", None) or obj)
        return
    from IPython.display import display

    display(obj)


def _markdown(text: str) -> None:
    if not _in_kernel():
        print(text)
        return
    from IPython.display import Markdown

    display_obj = Markdown(text)
    _display(display_obj)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        from ktutorial.report import fmt

        return fmt(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)  # markdown_table escapes '|' and newlines


def table(rows: Sequence[dict] | dict, columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table: from dicts (one row each), or a dict (two columns: name, value)."""
    if isinstance(rows, dict):
        rows = [{"": k, "value": v} for k, v in rows.items()]
        columns = columns or ["", "value"]
    rows = list(rows)
    if not rows:
        return "(nothing to show)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    from ktutorial.report import markdown_table

    return markdown_table(columns, ([_cell(r.get(c)) for c in columns] for r in rows))


def _as_dict(obj: Any) -> Optional[dict]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "summary") and callable(obj.summary):
        got = obj.summary()
        if isinstance(got, dict):
            return got
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return None


def show(obj: Any, title: Optional[str] = None) -> None:
    """Display anything the notebooks produce: markdown text, a PNG path or list of them, a
    list of rows, a dict or result object (as a two-column table), a Server."""
    if title:
        _markdown(f"**{title}**")
    if obj is None:
        return
    from ktutorial.server import Server

    if isinstance(obj, Server):
        _markdown(table(server_facts(obj)))
        return
    if isinstance(obj, (str, Path)) and str(obj).endswith(".png"):
        obj = [obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(p, (str, Path)) and str(p).endswith(".png") for p in obj):
        from IPython.display import Image

        for p in obj:
            _display(Image(filename=str(p)))
        return
    if isinstance(obj, str):
        _markdown(obj)
        return
    if isinstance(obj, (list, tuple)):
        rows = [_as_dict(r) or {"value": r} for r in obj]
        _markdown(table(rows))
        return
    as_dict = _as_dict(obj)
    if as_dict is not None:
        _markdown(table(as_dict))
        return
    print(obj)


def scrubbed(text: str) -> str:
    """Text with this machine's paths and hostname replaced (~, $KTUTORIAL_HOME, <host>, .)."""
    return _scrub_text(str(text), str(repo_root()))


def show_command(command: Any, env: Optional[dict] = None) -> None:
    """A launch command as a shell block, one flag a line, no path of this machine."""
    from ktutorial.server import Launch

    if isinstance(command, Launch):
        env = command.env if env is None else env
        command = command.command
    _markdown("```bash\n" + scrubbed(command_line(command, env, one_flag_a_line=True)) + "\n```")


def server_facts(server) -> dict:
    return {
        "engine": server.engine,
        "base URL": server.base_url,
        "model (served name)": server.model,
        "profile": server.profile,
        "pid (process group)": server.pid,
        "log": scrubbed(server.log_path) if server.log_path else None,
        "started here": bool(getattr(server, "owned", False)),
        "detached (outlives this notebook)": bool(getattr(server, "detached", False)),
    }


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
    import datetime as _dt

    from ktutorial.results import environment_stamp

    env = environment_stamp(engine=engine, model=model, extra=extra)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    env = {"time_utc": now, **env}
    gpus = env.get("gpus") or []
    shown = {k: env.get(k) for k in STAMP_KEYS if k in env}
    shown["gpus"] = ", ".join(str(g.get("name")) for g in gpus) if gpus else "none"
    _markdown("**Environment stamp** (what produced the outputs above)\n\n" + table(shown))
    return env


# =============================================================================================
# 00 check and plan
# =============================================================================================


def open_profile(profile: str):
    """Load a profile and show what it runs."""
    from ktutorial.profiles import load_profile

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
    _markdown(f"{prof.description}\n\n" + table(facts))
    return prof


def doctor_table(report) -> None:
    rows = [{"check": c.item, "status": c.status, "found": scrubbed(c.found), "needed": c.need, "fix": c.fix}
            for c in report.checks]
    _markdown(table(rows) + "\n\n" + "\n".join(f"- {line}" for line in report.summary))


def model_sizes(spec) -> None:
    """Where a MoE checkpoint's bytes are, from its config (ModelSpec)."""
    s = spec.summary()
    rows = [
        {"quantity": "layers (all MoE)", "value": s["layers"]},
        {"quantity": "experts per layer / chosen per token", "value": f"{s['experts_per_layer']} / {s['experts_per_token']}"},
        {"quantity": "parameters, total / active per token (B)", "value": f"{s['total_params_b']:.1f} / {s['active_params_b']:.1f}"},
        {"quantity": "one expert, FP8 (MB)", "value": s["expert_mb"]},
        {"quantity": "one layer's experts (GB)", "value": s["layer_experts_gb"]},
        {"quantity": "all experts (GB)", "value": s["all_experts_gb"]},
        {"quantity": "attention, norms, embeddings, head (GB)", "value": s["dense_gb"]},
        {"quantity": "checkpoint on disk (GB)", "value": s["checkpoint_gb"]},
        {"quantity": "KV cache per token, bf16 / FP8 (bytes)", "value": f"{s['kv_bytes_per_token_bf16']:,} / {s['kv_bytes_per_token_fp8']:,}"},
        {"quantity": "expert weights read per decoded token (GB)", "value": s["decode_expert_gb_per_token"]},
    ]
    share = s["all_experts_gb"] / (s["all_experts_gb"] + s["dense_gb"])
    _markdown(
        table(rows)
        + f"\n\nExperts are {share:.1%} of the weights; the attention and the rest are "
          f"{s['dense_gb']:.1f} GB. That split is why a {s['total_params_b']:.0f} B model fits beside one "
          f"consumer GPU: the GPU holds the small dense part (plus the KV cache), host RAM the experts."
    )


def ram_requirement(plan) -> None:
    """The host-RAM requirement, derived: the planner's parts and the arithmetic behind the experts."""
    spec, host = plan.spec, plan.memory["host"]
    parts = host["parts_gb"]
    expert_mb = spec.expert_bytes / 1e6
    lines = [
        f"- **experts: {parts['experts']:.1f} GB** = {spec.num_layers} layers × {spec.num_experts} experts × "
        f"{expert_mb:.2f} MB (3 matrices of {spec.hidden_size} × {spec.expert_intermediate_size} FP8 bytes plus their "
        "block scales). kt-kernel loads every expert of every layer, whatever `--kt-num-gpu-experts` puts on the GPU: "
        "the GPU copy is extra, not instead.",
    ]
    other = {k: v for k, v in parts.items() if k != "experts"}
    names = {"kt_kernel_buffers": "kt-kernel's buffers (sized by the prefill chunk)",
             "sglang_processes": "SGLang's own processes (scheduler, tokenizer, detokenizer, CUDA context)",
             "os_reserve": "the operating system"}
    for k, v in other.items():
        lines.append(f"- {names.get(k, k.replace('_', ' '))}: {v:.1f} GB")
    lines.append(f"- **needed: {host['needed_gb']:.0f} GB** of the {host['available_gb']:.0f} GB this plan's machine has.")
    _markdown("\n".join(lines) + "\n\nThat is the published tutorial's \"at least 256 GB\", derived: "
              "below it the experts do not fit and the server is killed while loading (see the troubleshooting page).")


def settings_table(plan) -> None:
    """The plan's launch settings, each with its value, why, and the flag's type from the schema."""
    from ktutorial.engines import sglang_kt

    schema = {row["flag"]: row for row in sglang_kt.settings_schema()}
    rows = []
    for flag, setting in plan.settings.items():
        s = schema.get(f"--{flag}", {})
        rows.append({
            "flag": f"`--{flag}`",
            "value": scrubbed(setting.value) if isinstance(setting.value, str) else setting.value,
            "why this value": setting.reason,
            "what the flag does": s.get("why", ""),
        })
    _markdown(table(rows))


def published_runs_table(rows: list[dict]) -> None:
    """plan.published_runs_comparison(): the planner's settings beside the published ones."""
    out = []
    for r in rows:
        pub = r["published"]
        planned = r["planner"]
        out.append({
            "published run": r["run"],
            "kt-cpu variant": r["cpu_variant"],
            "planner: GPU experts / chunk / KV pool": f"{planned.get('kt-num-gpu-experts')} / "
                                                      f"{planned.get('chunked-prefill-size')} / "
                                                      f"{planned.get('max-total-tokens')}",
            "planner: VRAM GiB per GPU": f"{r['planner_gpu_gib']:.1f} of {r['capacity_gib']:g}",
            "planner: RAM GB": round(r["planner_ram_gb"]),
            "planner verdict": r["planner_verdict"],
            "published settings": ", ".join(f"{k}={v}" for k, v in pub.items()),
            "published, checked by the planner": r.get("published_verdict", "-"),
        })
    notes = []
    for r in rows:
        if "published_verdict" in r:
            fp8 = r["published_fp8_kv_full_pool"]
            notes.append(
                f"- {r['run']}: as published, the card holds a {r['published_kv_pool_tokens']:,}-token KV pool with a "
                f"bf16 cache ({r['published_gpu_gib']:.1f} GiB per GPU: {r['published_verdict']}); the full "
                f"`--max-total-tokens` pool needs an FP8 KV cache ({fp8['gpu_gib']:.1f} GiB: {fp8['verdict']})."
            )
    _markdown(table(out) + ("\n\n" + "\n".join(notes) if notes else ""))


def try_settings(plan, overrides: dict) -> None:
    """Render the plan's command with `overrides`; show whether ktutorial refuses it and why."""
    from ktutorial.engines import sglang_kt

    shown = ", ".join(f"--{k.lstrip('-')} {v}" for k, v in overrides.items())
    try:
        sglang_kt.render_command(plan, overrides)
    except UserError as exc:
        message = str(exc)
        _markdown(f"`{shown}` → **refused before launch**:\n\n```text\n{message}\n```")
        return
    _markdown(f"`{shown}` → accepted")


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
        from ktutorial.download import public_url, resolve_endpoint, token_status

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
    from ktutorial import download

    if profile.model == "tiny":
        from ktutorial import tiny
        from ktutorial.hubserver import LocalHub

        hub = LocalHub.serving(TINY_REPO, tiny.ensure(profile.seed).hf_dir)
        local = Path(model_dir or Path(out_dir) / "models" / "tiny-hf")
        source = ModelSource(TINY_REPO, "main", hub.endpoint, local,
                             "the tiny model's FP8 folder, served on 127.0.0.1 by ktutorial's stand-in for the hub",
                             hub=hub)
    else:
        repo, revision = download.repo_for_model(profile.model)
        local = Path(os.path.expanduser(model_dir or profile.model_dir or f"~/models/{profile.model}"))
        source = ModelSource(repo, revision, None, local, "the Hugging Face hub")
    _markdown(table(source.facts()))
    return source


def plot_download(plan, out_dir: str | Path) -> list[Path]:
    """Each file of a download by size (log scale), weights and the rest apart; free disk noted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(plan.files, key=lambda f: -f.size)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(files) + 1)))
    colors = ["#1f77b4" if f.path.endswith(".safetensors") else "#aaaaaa" for f in files]
    ax.barh([f.path for f in files], [f.size / 1e6 for f in files], color=colors)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("MB (log scale)")
    total = plan.bytes_total / 1e9
    free = (plan.free_bytes + plan.bytes_reclaimable) / 1e9
    ax.set_title(f"{plan.repo_id}: {len(files)} files, {total:.3g} GB (weights in blue); "
                 f"{free:.0f} GB free here", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    ax.tick_params(axis="y", labelsize=7)
    from ktutorial.plots import save_figure

    return [save_figure(fig, figures_dir(out_dir) / "download_files.png")]


# =============================================================================================
# 02 launch
# =============================================================================================


def sglang_status(profile, srv=None, planned_model: str = "minimax-m2.1") -> None:
    """What the profile started: the command above (the plan's), or, for a profile serving another
    model than the one planned above (tiny-sglang serves the tiny), the command that runs."""
    if profile.start_sglang and (profile.model == planned_model or srv is None or not srv.launch.command):
        _markdown(f"Profile `{profile.name}`: **SGLang + KT is started** with the command above.")
    elif profile.start_sglang:
        _markdown(f"Profile `{profile.name}`: **SGLang + KT is started** for the profile's own model "
                  f"(`{profile.model}`, served as `{srv.model}`); the command above is {planned_model}'s for "
                  "this machine. What runs:")
        show_command(srv.launch.command)
    else:
        _markdown(
            f"Profile `{profile.name}`: **SGLang is not started here** (the profile says `start_sglang: false`): "
            "its command was rendered for the machine the profile describes and validated by ktutorial's checks "
            "and sglang-kt's own argument parser. The server this notebook starts is llama.cpp on the tiny model; "
            "the SGLang command is the one to run on your GPU machine (`ktutorial serve --profile minimax-m2.1`)."
        )


def parser_check(command: Sequence[str]) -> None:
    """Run sglang-kt 0.7.2's own argument parser over a rendered command and say what it made of it."""
    from ktutorial.engines import sglang_kt

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
    _markdown(f"sglang-kt's own parser (`ServerArgs.add_cli_args`, the pinned version) accepted the command. "
              f"How it read each of the {len(rows)} flags:\n\n" + table(rows))


def kt_cli_defaults(plan) -> dict:
    """What kt-cli 0.7.2's `kt run` picks without a terminal (AMXINT4, 1 GPU expert), and its older
    M2.1 default for GPU experts (TP × (VRAM GB − 16)), for this plan's machine (FACTS)."""
    tp = int(plan.settings["tensor-parallel-size"].value) if "tensor-parallel-size" in plan.settings else 1
    vram_gb = plan.hardware.gpu_memory_gib
    older = max(0, int(tp * (vram_gb - 16)))
    got = {"no terminal": {"kt-method": "AMXINT4", "kt-num-gpu-experts": 1},
           "older M2.1 default": {"kt-num-gpu-experts": older}}
    _markdown(table([{"kt run": k, "sets": ", ".join(f"--{f} {v}" for f, v in d.items())} for k, d in got.items()])
              + f"\n\n(TP {tp} × ({vram_gb:g} − 16) = {older} GPU experts on this plan's card.)")
    return got


def expect_refusal(fn: Callable, *args, **kwargs) -> None:
    """Call something that must be refused (a busy port, a bad value); show the message.
    Raises if it was not refused: the notebook would then be showing something untrue."""
    try:
        fn(*args, **kwargs)
    except UserError as exc:
        message = scrubbed(str(exc))
        _markdown(f"Refused, with the fix named:\n\n```text\n{message}\n```")
        return
    raise AssertionError(f"{getattr(fn, '__name__', fn)} was expected to refuse, and did not")


def diagnosis_example(pattern_id: str, plan=None, command: Optional[Sequence[str]] = None) -> None:
    """What ktutorial says when a launch fails: the catalog's log line for `pattern_id`, diagnosed
    with this plan's numbers."""
    from ktutorial import diagnose

    pattern = next((p for p in diagnose.catalog() if p.id == pattern_id), None)
    if pattern is None or not pattern.example:
        raise UserError(f"no diagnosis example {pattern_id!r}; ids: {', '.join(p.id for p in diagnose.catalog())}")
    found = diagnose.diagnose(pattern.example, plan=plan, command=list(command) if command else None)
    body = "\n".join(f"- **{d.title}.** {d.cause} **Fix:** {d.fix}" for d in found)
    _markdown(f"A log line such as\n\n```text\n{pattern.example}\n```\n\nis diagnosed as:\n\n{body}")


def gpu_experts_tradeoff(plan, out_dir: str | Path) -> list[Path]:
    """`--kt-num-gpu-experts` against the KV-cache tokens that still fit on the card, from the
    plan's own VRAM breakdown (bf16 and FP8 KV cache); the plan's choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = plan.memory["gpu"]
    parts = gpu["per_gpu_gib"]
    capacity = gpu["capacity_gib"]
    per_expert = gpu["gib_per_gpu_expert"]
    fixed = sum(v for k, v in parts.items() if k not in ("gpu_experts", "kv_cache"))
    free = capacity - fixed
    kv_bf16 = plan.spec.kv_bytes_per_token("bf16") / gpu["tp"]
    kv_fp8 = plan.spec.kv_bytes_per_token("fp8") / gpu["tp"]
    n_max = max(1, int(free / per_expert))
    ns = list(range(0, n_max + 1))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, per_token in (("bf16 KV cache", kv_bf16), ("FP8 KV cache", kv_fp8)):
        ax.plot(ns, [max(0.0, (free - n * per_expert) * 2**30 / per_token) / 1000 for n in ns], marker=".", label=label)
    chosen = plan.settings.get("kt-num-gpu-experts")
    if chosen is not None:
        ax.axvline(chosen.value, color="green", alpha=0.5)
        ax.annotate(f"plan: {chosen.value} experts, {gpu['kv_pool_tokens'] / 1000:.0f}k tokens",
                    (chosen.value, gpu["kv_pool_tokens"] / 1000), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("--kt-num-gpu-experts (experts per layer on the GPU)")
    ax.set_ylabel("KV-cache tokens that fit (thousands)")
    ax.set_title(f"{plan.hardware.gpu_name}: {free:.1f} of {capacity:g} GiB left after the fixed parts; "
                 f"{per_expert:.2f} GiB per GPU expert", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    from ktutorial.plots import save_figure

    return [save_figure(fig, figures_dir(out_dir) / "gpu_experts_tradeoff.png")]


# =============================================================================================
# 03 requests and every notebook that needs a server
# =============================================================================================


@dataclass
class Backend:
    """The server a notebook talks to, and whether this notebook must stop it."""

    base_url: str
    model: str
    engine: str
    server: Any = None
    started_here: bool = False


def server_for(profile, base_url: Optional[str] = None) -> Backend:
    """A server for this notebook: the one at `base_url`, else one started for the profile (by
    02_launch or `ktutorial serve --detach`), else a new one that `release()` stops."""
    from ktutorial import bench, server
    from ktutorial.client import resolve

    if base_url:
        url, model = resolve(base_url)
        backend = Backend(url, model, bench.detect_engine(url))
        _markdown(f"Using the server at {url} (model `{model}`), as the `base_url` parameter says.")
        return backend
    found = server.find_running(profile.name)
    if found is not None:
        _markdown(f"Reusing the {found.engine} server that `02_launch` (or `ktutorial serve --detach`) left "
                  f"running for profile `{profile.name}` at {found.base_url} (model `{found.model}`).")
        return Backend(found.base_url, found.model, found.engine, found, False)
    started = server.serve(profile)
    _markdown(f"No server was running for profile `{profile.name}`: started {started.engine} at "
              f"{started.base_url} (model `{started.model}`); this notebook stops it at its end.")
    return Backend(started.base_url, started.model, started.engine, started, True)


def release(backend: Backend) -> None:
    """Stop the server if this notebook started it; leave one 02_launch started running."""
    if backend.started_here and backend.server is not None:
        backend.server.stop()
        _markdown(f"Stopped the {backend.engine} server this notebook started.")
    else:
        _markdown("The server stays running for the next notebooks (`ktutorial stop` ends it; "
                  "`ktutorial tutorial` stops it at the end).")


def show_reply(reply) -> None:
    """A chat or messages reply: reasoning, answer, tool calls, finish reason, token usage."""
    reasoning = getattr(reply, "reasoning", None) or getattr(reply, "thinking", "")
    answer = getattr(reply, "content", None)
    if not isinstance(answer, str):
        answer = getattr(reply, "text", "")
    calls = getattr(reply, "tool_calls", None) or getattr(reply, "tool_uses", None) or []
    rows = {
        "reasoning": reasoning or "(none)",
        "answer": answer or "(none)",
        "tool calls": [f"{getattr(c, 'name', None) or c.get('name')}"
                       f"({json.dumps(getattr(c, 'arguments', None) or c.get('input'))})" for c in calls] or "(none)",
        "finish / stop reason": getattr(reply, "finish_reason", None) or getattr(reply, "stop_reason", None),
        "usage": getattr(reply, "usage", None),
    }
    _markdown(table(rows))


def show_round_trip(trip) -> None:
    """A tool round trip: each call the model made, what the handler returned, the final answer."""
    rows = [{"tool": c.name, "arguments": c.arguments, "handler returned": str(r)[:200]}
            for c, r in zip(trip.calls, trip.results)]
    _markdown((table(rows) if rows else "The model called no tool.")
              + f"\n\nThen, with the results in its history ({len(trip.transcript)} messages), it answered:")
    show_reply(trip.final)


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


def plot_token_times(record: dict, out_dir: str | Path) -> list[Path]:
    """One measured request: when each token arrived, with TTFT and the decode slope drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = record["samples"]["token_times_s"]
    m, p = record["metrics"], record["params"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot([t * 1000 for t in times], range(1, len(times) + 1), marker=".", label="tokens received")
    ax.axvline(m["ttft_s"] * 1000, color="orange", linestyle="--",
               label=f"TTFT {m['ttft_s'] * 1000:.0f} ms -> prefill {m['prefill_tok_s']:.0f} tok/s")
    ax.plot([m["ttft_s"] * 1000, m["e2e_s"] * 1000], [1, len(times)], color="green", alpha=0.6,
            label=f"decode {m['decode_tok_s']:.1f} tok/s = (n - 1) / (e2e - TTFT)")
    ax.set_xlabel("ms since the request was sent")
    ax.set_ylabel("tokens received")
    ax.set_title(f"one request: {p['input_len']}-token prompt, {m['output_tokens']} tokens out ({p['engine']})",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    from ktutorial.plots import save_figure

    return [save_figure(fig, figures_dir(out_dir) / "token_times.png")]


# =============================================================================================
# 04 sweeps and 06 comparison: observations computed from records
# =============================================================================================


def sweep_spec(profile, spec: Optional[str] = None, input_lens: Optional[Sequence[int]] = None,
               output_len: Optional[int] = None, repeats: Optional[int] = None):
    """The profile's sweep spec (or `spec`), with bench parameters overridden where given."""
    from ktutorial import bench

    loaded = bench.load_sweep(spec or profile.sweep_spec)
    for key, value in (("input_lens", input_lens), ("output_len", output_len), ("repeats", repeats)):
        if value is not None:
            loaded.bench[key] = list(value) if key == "input_lens" else int(value)
    combos = loaded.plan()
    _markdown(f"Sweep `{loaded.name}` (profile `{loaded.profile}`): {loaded.description}\n\n"
              f"{len(combos)} serve combination(s) × bench {json.dumps(loaded.bench)}")
    return loaded


def knobs_table(spec) -> None:
    """The knobs a sweep varies, the values it tries, and what each flag trades (settings_schema)."""
    from ktutorial.engines import sglang_kt

    why = {row["flag"]: row["why"] for row in sglang_kt.settings_schema()}
    values: dict[str, list] = {k: list(v) for k, v in spec.serve.items()}
    for combo in spec.combinations:
        for k, v in combo.items():
            values.setdefault(k, [])
            if v not in values[k]:
                values[k].append(v)
    rows = [{"knob": f"`{k}`", "values tried": v, "what it trades": why.get("--" + k.lstrip("-"), "a llama.cpp serve option")}
            for k, v in values.items()]
    _markdown(f"Sweep `{spec.name}` for profile `{spec.profile}`: {len(spec.plan())} server starts.\n\n" + table(rows))


def published_for(profile) -> Optional[dict]:
    """The published figures when the profile serves the model they were measured on, else None
    (drawing MiniMax-M2.1's figures beside the tiny model's would compare nothing)."""
    from ktutorial.report import load_published

    return load_published() if profile.model == "minimax-m2.1" else None


def sweep_plan_table(summary: dict) -> None:
    rows = [{"serve parameters": item["serve"], "command": scrubbed(item.get("command", "")),
             "already recorded": item["skip"]} for item in summary["plan"]]
    _markdown(table(rows))


def _fmt(x: Optional[float]) -> str:
    from ktutorial.report import fmt

    return fmt(x)


def _mean(values: Iterable[Any]) -> Optional[float]:
    from ktutorial.results import summarize

    return summarize(values)["mean"]


def sweep_observations(records: Sequence[dict]) -> None:
    """For each knob of a sweep: decode and prefill at each value, and the best value, from records."""
    from ktutorial.results import field

    bench = [r for r in records if r["kind"] == "bench" and field(r, "params.sweep")]
    failed = [r for r in records if r["kind"] == "sweep_failure"]
    if not bench:
        # A sweep that measured nothing has failed, whatever it wrote: the tutorial run stops here.
        reasons = "; ".join(str(field(r, "diagnosis")) for r in failed) or "no records were written"
        raise UserError(f"the sweep measured nothing: {len(failed)} combination(s) failed ({reasons})")
    knobs = sorted({k for r in bench for k in (field(r, "params.serve") or {})})
    lines = []
    for knob in knobs:
        values = sorted({(field(r, "params.serve") or {}).get(knob) for r in bench}, key=str)
        for metric, label in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            by_value = {v: _mean(field(r, metric) for r in bench if (field(r, "params.serve") or {}).get(knob) == v)
                        for v in values}
            by_value = {v: m for v, m in by_value.items() if m is not None}
            if len(by_value) < 2:
                continue
            best = max(by_value, key=by_value.get)
            worst = min(by_value, key=by_value.get)
            lines.append(
                f"- **{knob}, {label}**: best at {knob}={best} ({by_value[best]:.1f} tok/s, mean over all input "
                f"lengths), {by_value[best] / by_value[worst]:.2f}× the {knob}={worst} figure ({by_value[worst]:.1f})."
            )
    n = len(bench)
    lines.append(f"- {n} measured requests; {len(failed)} failed combination(s)"
                 + (": " + "; ".join(str(field(r, 'diagnosis')) for r in failed) if failed else "."))
    _markdown("\n".join(lines))


def threads_observations(records: Sequence[dict]) -> None:
    """kt-kernel's decode by thread count on the device host: the best, the all-vCPU trap, and
    kt-cli's old default (0.8 × logical CPUs), from the committed records."""
    from ktutorial import plots
    from ktutorial.results import field

    kt = [r for r in records if r["kind"] == plots.KT_KIND and field(r, "phase") == "decode"]
    if not kt:
        _markdown("No kt-kernel records.")
        return
    best = plots.best_threads(records, "decode")
    tokens = best["tokens"]
    sel = {field(r, "threads"): field(r, "latency_ms") for r in kt if field(r, "tokens") == tokens
           and plots._host(r) == best["host"]}
    logical = next((field(r, "env.cpu_logical") for r in kt if field(r, "env.cpu_logical")), None)
    most = max(sel)
    lines = [
        f"- On the device host ({best['host']}, {logical} logical CPUs), one decoded token through one layer is "
        f"fastest at **{best['threads']} threads: {best['latency_ms']:.2f} ms**, {best['expert_gb_s']:.0f} GB/s of "
        f"expert weights; {best['ceiling_tok_s_62_layers']:.1f} tok/s is the CPU-only ceiling for 62 layers.",
    ]
    if most != best["threads"]:
        lines.append(f"- With all {most} threads it takes {sel[most]:.2f} ms, {sel[most] / best['latency_ms']:.1f}× "
                     "slower: a kt-kernel thread on every vCPU leaves none for the thread that submits the work.")
    if logical:
        default = int(0.8 * logical)
        near = min(sel, key=lambda t: abs(t - default))
        lines.append(f"- kt-cli's older default, 0.8 × logical CPUs = {default}: the nearest measured count, {near}, "
                     f"takes {sel[near]:.2f} ms ({sel[near] / best['latency_ms'] - 1:+.0%} against the best). "
                     "The planner's `--kt-cpuinfer` leaves cores free for the same reason (see its reason in 00's settings table).")
    _markdown("\n".join(lines))


def published_llamacpp_table() -> dict:
    """The published KT against llama.cpp figures (2 x RTX 5090 + EPYC 9355, 32768 in, 512 out), labelled."""
    from ktutorial.report import load_published

    pub = load_published()
    rows = [{"published (KTransformers tutorial)": r["config"], "input tokens": r["input_len"],
             "prefill tok/s": r["prefill_tok_s"], "decode tok/s": r["decode_tok_s"]}
            for r in pub["llamacpp_comparison"]]
    kt = next(r for r in pub["llamacpp_comparison"] if r["config"].startswith("KT"))
    others = [r for r in pub["llamacpp_comparison"] if r is not kt]
    best_prefill = max(others, key=lambda r: r["prefill_tok_s"])
    best_decode = max(others, key=lambda r: r["decode_tok_s"])
    _markdown(
        table(rows)
        + f"\n\nFrom these figures: KT prefills {kt['prefill_tok_s'] / best_prefill['prefill_tok_s']:.1f}× faster than "
          f"llama.cpp's best prefill ({best_prefill['config']}) and decodes "
          f"{kt['decode_tok_s'] / best_decode['decode_tok_s'] - 1:.0%} faster than its best decode "
          f"({best_decode['config']}); no llama.cpp setting was best at both. Published, not measured by ktutorial: "
          "no method, versions or spread were given."
    )
    return pub


def comparison_observations(records: Sequence[dict]) -> None:
    """kt-kernel against llama.cpp through one M2.1-shape MoE layer, CPU only, from the device records."""
    from ktutorial import plots
    from ktutorial.results import field

    kt = [r for r in records if r["kind"] == plots.KT_KIND]
    ll = [r for r in records if r["kind"] == plots.LLAMACPP_KIND]
    if not kt or not ll:
        _markdown("The records hold no kt-kernel / llama.cpp pair to compare.")
        return

    def best(recs, phase):
        sel = [(plots.layer_tok_s(r), r) for r in recs if field(r, "phase") == phase and plots.layer_tok_s(r)]
        return max(sel, key=lambda x: x[0]) if sel else (None, None)

    kd, kdr = best(kt, "decode")
    ld, ldr = best(ll, "decode")
    kp, kpr = best(kt, "prefill")
    lp, lpr = best(ll, "prefill")
    info = next((field(r, "system_info") for r in ll if field(r, "system_info")), "")
    lines = [
        f"- **Decode** (one token through one layer): kt-kernel FP8 at best {kd:.0f} tok/s "
        f"({field(kdr, 'threads')} threads) against llama.cpp Q8_0 at best {ld:.0f} tok/s ({field(ldr, 'threads')} "
        f"threads): **{kd / ld:.2f}×**. Over 62 layers that is {kd / 62:.1f} against {ld / 62:.1f} tok/s, "
        "the CPU side alone.",
        f"- **Prefill** (a chunk through one layer): kt-kernel at best {kp:.0f} tok/s ({field(kpr, 'tokens')}-token "
        f"chunks, {field(kpr, 'threads')} threads) against llama.cpp at best {lp:.0f} tok/s "
        f"({field(lpr, 'threads')} threads): **{kp / lp:.2f}×**. On the CPU alone kt-kernel does not win prefill; "
        "SGLang-KT's prefill advantage comes from sending long chunks to the GPU layer by layer "
        "(`--kt-gpu-prefill-token-threshold`), not from the CPU kernel.",
        f"- llama.cpp here is the PyPI build (xllamacpp); its CPU backend reported `{info.strip().rstrip('|').strip()}` "
        "on an AMX host: a build compiled for the host could do better.",
    ]
    _markdown("\n".join(lines))


def _best_layer_tok_s(records: Sequence[dict], kind: str, phase: str) -> Optional[float]:
    from ktutorial import plots
    from ktutorial.results import field

    values = [plots.layer_tok_s(r) for r in records if r["kind"] == kind and field(r, "phase") == phase]
    values = [v for v in values if v]
    return max(values) if values else None


def plot_speedups(published: dict, records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """KT over llama.cpp, prefill and decode: the published end-to-end ratio (GPU machine) beside
    the ratio measured through one M2.1 layer on the device host's CPU. Best against best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ktutorial import plots

    rows = published["llamacpp_comparison"]
    kt = next(r for r in rows if r["config"].startswith("KT"))
    others = [r for r in rows if r is not kt]
    pub = {m: kt[f"{m}_tok_s"] / max(r[f"{m}_tok_s"] for r in others) for m in ("prefill", "decode")}
    ours = {}
    for m in ("prefill", "decode"):
        k = _best_layer_tok_s(records, plots.KT_KIND, m)
        ll = _best_layer_tok_s(records, plots.LLAMACPP_KIND, m)
        ours[m] = k / ll if k and ll else None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    xs = range(2)
    width = 0.38
    labels = ("prefill", "decode")
    bars_pub = ax.bar([x - width / 2 for x in xs], [pub[m] for m in labels], width,
                      label="published: SGLang + KT vs llama.cpp, end to end, 2 x RTX 5090 + EPYC 9355", color="#999999")
    bars_ours = ax.bar([x + width / 2 for x in xs], [ours[m] or 0 for m in labels], width,
                       label="measured: kt-kernel vs llama.cpp, one M2.1 layer, CPU only (device host)", color="#1f77b4")
    for bars in (bars_pub, bars_ours):
        for b in bars:
            ax.annotate(f"{b.get_height():.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("KT / llama.cpp (best against best)")
    ax.set_title("How much faster KT is: published beside measured", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    from ktutorial.plots import save_figure

    return [save_figure(fig, figures_dir(out_dir) / "kt_vs_llamacpp_ratios.png")]


def bench_observations(records: Sequence[dict]) -> None:
    """The tiny bench in two sentences: decode and prefill by input length, labelled."""
    from ktutorial.report import bench_summary

    groups = bench_summary(records)
    if not groups:
        _markdown("No bench records.")
        return
    parts = []
    for g in groups:
        m = g["metrics"]
        parts.append(f"{g['key']['input_len']} tokens in: prefill {m['prefill_tok_s']['mean']:.0f} ± "
                     f"{m['prefill_tok_s']['stdev']:.0f}, decode {m['decode_tok_s']['mean']:.1f} ± "
                     f"{m['decode_tok_s']['stdev']:.1f} tok/s (n={g['n']})")
    env = records[0]["env"]
    _markdown(f"Measured here, {env.get('engine')} {env.get('engine_version')} on {env.get('cpu_model')} "
              f"({env.get('cpu_physical_cores')} cores), model `{env.get('model')}`: " + "; ".join(parts)
              + ". A tiny model on a small CPU: these numbers check the method, they say nothing about M2.1's speed.")


# =============================================================================================
# 05 Claude Code
# =============================================================================================


def checks_table(checks: Sequence) -> None:
    rows = [{"what Claude Code sends": c.name, "works": c.ok, "seen": scrubbed(c.detail), "fix": c.fix or "",
             "s": c.elapsed_s} for c in checks]
    ok = sum(1 for c in checks if c.ok)
    _markdown(f"{ok} of {len(checks)} parts work.\n\n" + table(rows))


def plot_checks(checks: Sequence, out_dir: str | Path) -> list[Path]:
    """Seconds each replayed part of a Claude Code request took (the big ones are prefill)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in checks if c.elapsed_s is not None]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh([c.name[:60] for c in rows], [c.elapsed_s for c in rows],
            color=["#2ca02c" if c.ok else "#d62728" for c in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("each part of a Claude Code request, replayed (green: works)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    from ktutorial.plots import save_figure

    return [save_figure(fig, figures_dir(out_dir) / "claude_code_checks.png")]


def claude_turn(prompt: str, backend: Backend, timeout_s: float = 120, **kwargs):
    """One real `claude -p` turn against the backend; without the CLI, say how to install it."""
    from ktutorial import claude_code

    try:
        result = claude_code.run(prompt, backend.base_url, backend.model, timeout_s=timeout_s, **kwargs)
    except MissingDependency as exc:
        _markdown(f"Claude Code is not installed here: {exc}")
        return None
    calls = [{"tool": c["name"], "input": c["input"], "output": str(c["output"])[:200], "error": c["is_error"]}
             for c in result.tool_calls]
    _markdown(table({"Claude Code": result.claude_version, "turns": result.num_turns, "wall s": result.wall_s,
                     "stop reason": result.stop_reason, "its answer": result.result})
              + ("\n\nTools it ran:\n\n" + table(calls) if calls else "\n\nIt ran no tool."))
    return result


# =============================================================================================
# 07 inside KT
# =============================================================================================


def agreement_table(out: dict) -> None:
    rows = []
    for r in out["comparisons"] + out.get("negative_controls", []):
        rows.append({
            "a": r["a"], "b": r["b"],
            "same greedy tokens": f"{r['token_matches']}/{r['positions']}",
            "same argmax (teacher forced)": f"{r['argmax_matches']}/{r['positions']}",
            "max |Δlogit|": r["max_abs_dlogit"], "MoE rel err": r["moe_rel_err"],
            "max |Δlogprob|": r["max_abs_dlogprob"], "router flips": r["router_flips"],
            "agrees": "yes" if r["ok"] else "NO: " + ", ".join(r["failed_on"]),
        })
    tol = "; ".join(f"{k}: " + ", ".join(f"{m} ≤ {v:g}" for m, v in t.items()) for k, t in out["tolerances"].items())
    controls = out.get("negative_controls", [])
    caught = sum(1 for r in controls if not r["ok"])
    reply = out["reference_text"].replace("\n", " ⏎ ").strip()
    text = (f"Prompt of {out['prompt_tokens']} tokens. The reference's {len(out['reference_tokens'])} greedy tokens "
            f"(end-of-turn ignored, so the positions run on past the reply): `{reply[:160]}`\n\n"
            + table(rows) + f"\n\nTolerances — {tol}.")
    if controls:
        text += (f"\n\nNegative controls (the last {len(controls)} rows are deliberate bugs): "
                 f"**{caught} of {len(controls)} caught** (each must say NO).")
    _markdown(text)


def coverage_table(study: dict) -> None:
    rows = []
    for i, n in enumerate(study["gpu_experts"]):
        row = {"GPU experts / layer": n}
        for s, values in study["coverage"].items():
            row[s] = f"{100 * values[i]:.0f}%"
        rows.append(row)
    _markdown(table(rows))


def hybrid_observations(records: Sequence[dict]) -> None:
    """The measured `--kt-num-gpu-experts` trade-off at M2.1 layer shape, in sentences."""
    from ktutorial import plots
    from ktutorial.results import field

    hyb = [r for r in records if r["kind"] == plots.HYBRID_KIND]
    # Records that name their GPU kernel (SGLang's fused MoE since issue 13) supersede the first torch loop's.
    hyb = [r for r in hyb if field(r, "gpu_kernel")] or hyb
    if not hyb:
        _markdown("No hybrid-layer records.")
        return
    experts = max(field(r, "experts") or 0 for r in hyb)
    gpu = next((field(r, "gpu") for r in hyb if field(r, "gpu")), "the GPU")
    lines = []
    for tokens in sorted({field(r, "tokens") for r in hyb}):
        what = "decode, 1 token" if tokens == 1 else f"prefill chunk, {tokens} tokens"
        by = {}
        for routing in sorted({field(r, "routing") for r in hyb}):
            by[routing] = {field(r, "n_gpu_experts"): r for r in hyb
                           if field(r, "tokens") == tokens and field(r, "routing") == routing}
        for routing, sel in by.items():
            if 0 not in sel or experts not in sel:
                continue
            lines.append(f"- **{what}, {routing} routing**: CPU only {_fmt(field(sel[0], 'latency_ms'))} ms; all "
                         f"{experts} experts on the {gpu} {_fmt(field(sel[experts], 'latency_ms'))} ms.")
        common = sorted(set.intersection(*(set(v) for v in by.values())) - {0, experts}) if by else []
        n = next((n for n in common if n >= experts // 8), common[-1] if common else None)
        if n is not None and len(by) > 1:
            parts = []
            for routing, sel in by.items():
                r, base = sel[n], field(sel[0], "latency_ms")
                parts.append(f"{routing} routing puts {field(r, 'gpu_coverage'):.0%} of the routed experts there and "
                             f"the layer takes {_fmt(field(r, 'latency_ms'))} ms ({field(r, 'latency_ms') / base - 1:+.0%} "
                             "against CPU only)")
            lines.append(f"- With {n} of {experts} experts on the GPU ({what}): " + "; ".join(parts) + ".")
    lines.append("- What decides the gain is the share of routed experts that land on the GPU (its coverage), "
                 "compare the rows above: with skewed routing and the hottest experts placed on the GPU, the same "
                 "count covers far more of the traffic than with uniform random routing.")
    _markdown("\n".join(lines))
