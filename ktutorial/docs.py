"""The site: hand-written pages from docs/, pages generated from code, executed notebooks.

`build_site(out)` stages everything into OUT/docs and runs `mkdocs build --strict` into OUT/site:

- docs/ (the home page and static files), copied;
- reference pages generated from code, so they cannot drift from it: the CLI's usage (from the
  typer/click command tree), the launch parameters with their reasons (`engines.sglang_kt`'s
  schema and the planner's choices), troubleshooting (`diagnose.catalog_markdown()`), serving for
  Claude Code (`claude_code.backend_docs`);
- results: `report.write_report` over the committed records in results/ (and over the records the
  tutorial run wrote into OUT/records, when there are any); the GPU host's records and executed
  notebooks on a page of their own;
- the executed notebooks from OUT/notebooks. MkDocs renders them; it never executes them
  (papermill did, in `ktutorial.notebooks`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ktutorial import claude_code, diagnose, report, server
from ktutorial import plan as planning
from ktutorial.engines import sglang_kt
from ktutorial.errors import UserError
from ktutorial.layout import NOTEBOOKS, NOTEBOOKS_DIR, repo_root
from ktutorial.profiles import load_profile
from ktutorial.tables import markdown_table as _md_table

NOTEBOOK_TITLES = {
    "00_check_and_plan": "0 · Check and plan",
    "01_download": "1 · Download",
    "02_launch": "2 · Launch",
    "03_requests": "3 · Requests",
    "04_tuning_sweeps": "4 · Tuning sweeps",
    "05_claude_code": "5 · Claude Code",
    "06_llamacpp_comparison": "6 · Against llama.cpp",
    "07_inside_kt": "7 · Inside KT",
}
REFERENCE_PAGES = {
    "reference/cli.md": "Command line",
    "reference/launch-parameters.md": "Launch parameters",
    "reference/troubleshooting.md": "Troubleshooting",
    "reference/claude-code.md": "Claude Code backends",
}


def _root() -> Path:
    return repo_root()


# ---- reference: the command line ----------------------------------------------------------------


def _param_type(param, ctx) -> str:
    display = getattr(param, "display_type", None)
    if callable(display):
        return str(display(ctx)).strip("<>")
    kind = getattr(param, "type", None)
    return getattr(kind, "name", "") or ""


def cli_reference(root) -> str:
    """Every `ktutorial` command with its usage, help and options, from the click command tree
    (`typer.main.get_command(app)`, passed in by the CLI: the site builder does not import it).

    typer ships its own copy of click, so commands and parameters are read by shape, not class."""
    out = [
        "# Command line",
        "",
        "Generated from the `ktutorial` command itself (`ktutorial COMMAND --help` prints the same).",
        "",
    ]

    def walk(cmd, path: list[str], parent) -> None:
        name = " ".join(path)
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent)
        if parent is not None:
            out.append(f"{'#' * min(len(path), 4)} `{name}`")
            out.append("")
            if cmd.help:
                out.append(" ".join(cmd.help.split()))
                out.append("")
            # typer writes arguments as {name}; click's help writes NAME
            usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(cmd.collect_usage_pieces(ctx)))
            out.append(f"```text\n{name} {usage}\n```")
            out.append("")
            rows = []
            for p in cmd.params:
                if getattr(p, "hidden", False):
                    continue
                is_argument = p.param_type_name == "argument"
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts]) if not is_argument else f"`{p.name.upper()}`"
                if is_argument:
                    kind = "argument"
                elif getattr(p, "is_flag", False):
                    kind = "flag"
                else:
                    kind = _param_type(p, ctx)
                default = None if callable(p.default) else p.default
                if p.required:
                    default_text = "required"
                elif default is None or default is False or (isinstance(default, (list, tuple)) and not default):
                    default_text = ""
                else:
                    default_text = f"`{default}`"
                rows.append([names, kind, default_text, " ".join((getattr(p, "help", None) or "").split())])
            if rows:
                out.append(_md_table(["option", "type", "default", "what it does"], rows))
                out.append("")
        if hasattr(cmd, "list_commands"):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                if sub is not None and not getattr(sub, "hidden", False):
                    walk(sub, [*path, sub_name], ctx)

    walk(root, ["ktutorial"], None)
    return "\n".join(out) + "\n"


# ---- reference: launch parameters ----------------------------------------------------------------


def launch_parameters_page() -> str:
    """Every flag ktutorial emits, what it does, and what the planner chose (with why) for the
    tiny profile's described machine and for the published machines."""
    schema = sglang_kt.settings_schema()
    rows = [[f"`{r['flag']}`", r["type"], ", ".join(r["choices"]) if r["choices"] else "", r["why"]] for r in schema]
    env_rows = [[f"`{e['name']}`", f"`{e['value']}`", e["why"]] for e in sglang_kt.env_schema()]
    prof = load_profile("tiny")
    plan = server.plan_for_profile(prof, model="minimax-m2.1")
    chosen = [[f"`--{flag}`", f"`{s.value}`", s.reason] for flag, s in plan.settings.items()]
    command = sglang_kt.command_line(sglang_kt.render_command(plan, {"host": "127.0.0.1", "port": 30000},
                                                              python="python"), sglang_kt.render_env(plan))
    comparison = planning.published_runs_comparison()
    flags = list(planning.COMPARED_FLAGS)
    pub_rows = []
    for flag in flags:
        pub_rows.append([f"`--{flag}`", *[r["planner"].get(flag, "") for r in comparison]])
    pub_rows.append(["verdict", *[r["planner_verdict"] for r in comparison]])
    pub_rows.append(["VRAM GiB per GPU", *[f"{r['planner_gpu_gib']:.1f} of {r['capacity_gib']:g}" for r in comparison]])
    pub_rows.append(["RAM GB", *[f"{r['planner_ram_gb']:.0f}" for r in comparison]])
    return "\n".join([
        "# Launch parameters",
        "",
        "Every flag of `python -m sglang.launch_server` that ktutorial can emit, what it does, and the values "
        "the planner chooses, each with its reason. Generated from `ktutorial.engines.sglang_kt.settings_schema()` "
        "and `ktutorial.plan`: the notebooks, `ktutorial plan` and this page print the same objects.",
        "",
        "## The flags",
        "",
        _md_table(["flag", "type", "allowed values", "what it does"], rows),
        "",
        "## The environment",
        "",
        _md_table(["variable", "value", "why"], env_rows),
        "",
        f"## Planned for {plan.hardware.label()}",
        "",
        f"The machine the `tiny` profile describes; verdict: **{plan.verdict}**. "
        "Run `ktutorial plan` with your own machine's description for yours.",
        "",
        _md_table(["flag", "value", "why this value"], chosen),
        "",
        "```bash\n" + command + "\n```",
        "",
        "## Planned for the published machines",
        "",
        "The planner's settings for each machine of the published throughput table, with the published "
        "80,000-token KV pool as the goal (notebook 0 checks the published settings against the same arithmetic).",
        "",
        _md_table(["", *[r["run"] for r in comparison]], pub_rows),
        "",
    ])


# ---- reference: troubleshooting and Claude Code ------------------------------------------------


def troubleshooting_page() -> str:
    return "\n".join([
        "# Troubleshooting",
        "",
        "When a server fails to start, ktutorial reads its log, exit code and command line against this "
        "catalog and prints each matching entry with its numbers filled in from your plan (`ktutorial serve` "
        "and the notebooks do it; the numbers below are generic). Generated from `ktutorial.diagnose`.",
        "",
        diagnose.catalog_markdown(),
    ])


def claude_code_page() -> str:
    plan = server.plan_for_profile(load_profile("tiny"), model="minimax-m2.1")
    command = sglang_kt.render_command(plan, {"host": "127.0.0.1", "port": 30000}, python="python")
    text = claude_code.backend_docs(sglang_command=command)
    return "# Claude Code backends\n\nGenerated from `ktutorial.claude_code.backend_docs()`.\n\n" + text.replace(
        "## Claude Code on a local backend\n", "", 1)


# ---- results ---------------------------------------------------------------------------------------


def _report_page(record_paths: list[Path], folder: Path, title: str, preface: str) -> bool:
    try:
        written = report.write_report([str(p) for p in record_paths], folder)
    except UserError:
        return False
    md = written[0]
    body = md.read_text(encoding="utf-8").split("\n", 1)[1]  # drop "# ktutorial report"
    (folder / "index.md").write_text(f"# {title}\n\n{preface}\n{body}", encoding="utf-8")
    md.unlink()
    return True


# The real engine on a GPU host (results/gpu-host.sh), and the same checks against llama.cpp on the
# tiny profile for the comparison; the host's executed notebooks beside their records.
GPU_HOST_RECORDS = ("gpu-host-*.jsonl", "cpu-*-tiny-llamacpp.jsonl")
GPU_HOST_NOTEBOOKS = "gpu-host-*-notebooks"
GPU_HOST_PREFACE = """\
What ran on a lent GPU host (one NVIDIA H200 beside a 16-vCPU Xeon with AMX) through ktutorial's
own commands, with sglang-kt 0.7.2 + kt-kernel 0.7.2 from the offline bundle: `bash results/gpu-host.sh
OUT` (`results/README.md` says how), every record stamped with the commit it ran.

- **The tiny model through the real engine** (`ktutorial serve --profile tiny-sglang`): the exact
  replies over OpenAI and Anthropic, plain, streamed and with a Bash tool round trip; the sweep of
  GPU experts (0, 4, all 16) and of the layerwise-prefill threshold (below and above the prompt), each
  combination answering the tiny's exact reply; no SGLang process left after a stop.
- **MiniMax-M2.1's layer shape** (`ktutorial synth --layers 2`): the engine over 0 to 256 GPU experts,
  prompts below and above the prefill threshold, beside kt-kernel alone at the same threads.
- **Claude Code**: its requests straight at sglang-kt and through ktutorial's proxy, with each
  reasoning parser, beside llama.cpp on the tiny profile (a CPU machine, `cpu-*` records).
- **The real engine's logs** for launches ktutorial refuses before they start, and the diagnosis it
  makes of each.

What differs from the tiny profile on llama.cpp, as the tables show: sglang-kt refuses the `role: system`
entry Claude Code sends (llama.cpp takes it; the proxy folds it into `system`); with `--reasoning-parser
minimax` its Messages route drops the reasoning, so the planner keeps `minimax-append-think`; it reports no
decode rate of its own, so client and server agree on end-to-end latency instead; the launch takes 35-110 s
instead of under one; and the GPU/CPU split of the experts is the engine's, not a CPU build's.

The host's executed notebooks (those that ran there: 04 runs a whole sweep, which `ktutorial sweep`
ran instead; 07 compares with llama.cpp, whose wheel does not fit beside the engine's bundle in one
transfer to the host) are under this page.
"""


def results_pages(stage: Path, out_dir: Path) -> list:
    """results/index.md from the committed records; results/gpu-host/ from the GPU host's records and
    executed notebooks; results/tutorial-run/index.md from this build's. Returns nav entries."""
    pages: list = []
    committed = _root() / "results"
    host_records = sorted(p for pattern in GPU_HOST_RECORDS for p in committed.glob(pattern))
    if host_records and _report_page(host_records, stage / "results" / "gpu-host", "The tutorial on a GPU host",
                                     GPU_HOST_PREFACE):
        entries: list = [{"Records": "results/gpu-host/index.md"}]
        for folder in sorted(committed.glob(GPU_HOST_NOTEBOOKS)):
            target = stage / "results" / "gpu-host" / "notebooks"
            target.mkdir(parents=True, exist_ok=True)
            for nb in sorted(folder.glob("*.ipynb")):
                shutil.copy2(nb, target / nb.name)
                entries.append({NOTEBOOK_TITLES.get(nb.stem, nb.stem): f"results/gpu-host/notebooks/{nb.name}"})
        pages.append({"The tutorial on a GPU host": entries})
    if sorted(committed.glob("*.jsonl")) and _report_page(
        [committed], stage / "results", "Results",
        "Tables and charts made by `ktutorial report` from the records committed in `results/`, measured on a "
        "GPU device host (see `results/README.md` for how). The published figures are labelled *published*: "
        "ktutorial did not measure them. Nothing on this page is typed by hand.\n\n"
        "The records of this site's own tutorial run (the tiny profile) are on the "
        "[tutorial run](tutorial-run/index.md) page.\n",
    ):
        pages.append("results/index.md")
    run_records = sorted((out_dir / "records").glob("*.jsonl")) if (out_dir / "records").is_dir() else []
    if run_records and _report_page(
        run_records, stage / "results" / "tutorial-run", "This tutorial run",
        "The records the notebooks wrote while this site was built (`ktutorial tutorial`), from the profile it "
        "ran with. On the tiny profile they check the method on a tiny model and a small CPU; they are not "
        "MiniMax-M2.1 figures.\n",
    ):
        pages.append("results/tutorial-run/index.md")
    if "results/tutorial-run/index.md" not in pages and "results/index.md" in pages:
        index = stage / "results" / "index.md"
        index.write_text(index.read_text(encoding="utf-8").replace(
            "The records of this site's own tutorial run (the tiny profile) are on the "
            "[tutorial run](tutorial-run/index.md) page.\n", ""), encoding="utf-8")
    return pages


# ---- staging and building ---------------------------------------------------------------------------


def stage_site(out_dir: str | Path, cli_command) -> tuple[Path, list]:
    """Copy and generate every page into OUT/docs; return it and the nav. `cli_command`: the
    `ktutorial` click command, for the CLI reference page."""

    out = Path(out_dir).resolve()
    stage = out / "docs"
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(_root() / "docs", stage)
    nav: list = [{"Home": "index.md"}]

    executed = out / NOTEBOOKS_DIR
    tutorial = []
    for name in NOTEBOOKS:
        src = executed / f"{name}.ipynb"
        if src.is_file():
            (stage / "notebooks").mkdir(exist_ok=True)
            shutil.copy2(src, stage / "notebooks" / src.name)
            tutorial.append({NOTEBOOK_TITLES[name]: f"notebooks/{src.name}"})
    if tutorial:
        nav.append({"Tutorial": tutorial})

    results = results_pages(stage, out)
    if results:
        titles = {"results/index.md": "Device host records", "results/tutorial-run/index.md": "This tutorial run"}
        nav.append({"Results": [p if isinstance(p, dict) else {titles[p]: p} for p in results]})

    (stage / "reference").mkdir(exist_ok=True)
    generators = {
        "reference/cli.md": lambda: cli_reference(cli_command),
        "reference/launch-parameters.md": launch_parameters_page,
        "reference/troubleshooting.md": troubleshooting_page,
        "reference/claude-code.md": claude_code_page,
    }
    for rel, make in generators.items():
        (stage / rel).write_text(make(), encoding="utf-8")
    nav.append({"Reference": [{title: rel} for rel, title in REFERENCE_PAGES.items()]})
    return stage, nav


def build_site(out_dir: str | Path, cli_command, strict: bool = True) -> Path:
    """Stage the site and run `mkdocs build --strict` into OUT/site; returns OUT/site.
    `cli_command`: the `ktutorial` click command (`typer.main.get_command(cli.app)`)."""

    out = Path(out_dir).resolve()
    missing = [n for n in NOTEBOOKS if not (out / NOTEBOOKS_DIR / f"{n}.ipynb").is_file()]
    if missing:
        # The home page links every notebook: a strict build of a partial site would fail on them.
        raise UserError(f"no executed notebook(s) {', '.join(missing)} in {out / NOTEBOOKS_DIR}: run "
                        f"`ktutorial tutorial --out {out_dir}` (all notebooks) first")
    stage, nav = stage_site(out, cli_command)
    config = yaml.safe_load((_root() / "mkdocs.yml").read_text())
    config.update({"docs_dir": str(stage), "site_dir": str(out / "site"), "nav": nav})
    generated = out / "mkdocs.generated.yml"
    generated.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "mkdocs", "build", "--clean", "--config-file", str(generated)]
    if strict:
        command.append("--strict")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=out)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise UserError(f"mkdocs build failed (config {generated}):\n{tail}")
    return out / "site"
