"""The tutorial's notebooks and site.

- Notebooks in git carry no outputs, no execution counts, no injected parameters; each has one
  `parameters` cell with `profile` and ends with the environment stamp.
- The whole tutorial runs end to end on the tiny profile (papermill, every notebook; a failed
  cell fails the run), leaves no server behind, and builds the site with `mkdocs build --strict`.
- The built site, served on 127.0.0.1, renders in headless Chromium with each notebook's executed
  outputs (a chart, the environment stamp) on its page; screenshots go to build/screenshots/.
- Every table of those pages is in sight at a laptop's and a phone's width: none cut by a clipping
  box, none past the text column, none hiding columns behind a scrollbar when its words could fit
  side by side (tests/chromium.py measures them; a control page and the site without
  docs/stylesheets/tables.css show the measure catches each case).

The end-to-end run takes about 2 minutes on 2 cores. To check an existing `make tutorial` build
instead of running another, set KTUTORIAL_TUTORIAL_BUILD=build (it must be newer than the sources).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import chromium  # tests/chromium.py
import psutil
import pytest

from ktutorial import notebooks as nbmod
from ktutorial import tutorial
from ktutorial.layout import NOTEBOOKS, repo_root

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
SCREENSHOTS = REPO / "build" / "screenshots"
# Where tables are measured: a laptop's screen and a phone's (tests/chromium.py, PROBE_SCRIPT).
TABLE_WIDTHS_PX = (1280, 400)


def _stored(name: str) -> dict:
    return json.loads((NB_DIR / f"{name}.ipynb").read_text())


def _tags(cell: dict) -> list:
    return cell.get("metadata", {}).get("tags", [])


# ---- notebooks as stored ------------------------------------------------------------------------


def test_every_notebook_is_listed_and_present():
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs_or_injected_cells(name):
    nb = _stored(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code"
    for cell in code:
        src = "".join(cell["source"])
        assert cell.get("outputs") == [], f"{name}: a cell carries outputs: {src[:60]!r}"
        assert cell.get("execution_count") is None, f"{name}: a cell carries an execution count: {src[:60]!r}"
        assert "injected-parameters" not in _tags(cell), f"{name}: an injected-parameters cell is stored"
        assert not src.startswith("# Parameters"), f"{name}: papermill's injected cell is stored"
    assert "papermill" not in nb.get("metadata", {}), f"{name}: papermill metadata is stored"
    params = [c for c in code if "parameters" in _tags(c)]
    assert len(params) == 1, f"{name}: needs exactly one cell tagged `parameters`, has {len(params)}"
    src = "".join(params[0]["source"])
    assert re.search(r'^profile = "tiny"$', src, re.M), f"{name}: the parameters cell must set profile = \"tiny\""
    assert re.search(r"^out_dir = ", src, re.M), f"{name}: the parameters cell must set out_dir"
    assert "nb.stamp(" in "".join(code[-1]["source"]), f"{name}: the last cell must show the environment stamp"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_no_machine_paths_and_no_shell_escapes(name):
    text = (NB_DIR / f"{name}.ipynb").read_text()
    for private in ("/root/", "/home/", "/work/", "/tmp/", "/Users/", str(Path.home())):
        assert private not in text, f"{name} holds a path of a machine: {private}"
    for cell in _stored(name)["cells"]:
        if cell["cell_type"] == "code":
            assert not re.search(r"^\s*[!%]", "".join(cell["source"]), re.M), f"{name}: a shell escape or magic"


# ---- helpers the notebooks rely on -----------------------------------------------------------


def test_echo_only_runs_echo_and_refuses_the_rest():
    assert nbmod.echo_only("echo ktutorial") == "ktutorial\n"
    for cmd in ("rm -rf /", "echo hi; rm -rf /", "echo $(id)", "cat /etc/passwd | head"):
        assert nbmod.echo_only(cmd).startswith("refused"), cmd


def test_scrub_executed_removes_machine_paths(tmp_path):
    home = str(Path.home())
    nb = {"cells": [{"cell_type": "code", "source": "x", "metadata": {}, "outputs": [
        {"output_type": "stream", "name": "stdout", "text": f"log at {home}/logs/a.log and {repo_root()}/build"},
        {"output_type": "display_data", "metadata": {},
         "data": {"text/markdown": f"{os.environ['KTUTORIAL_HOME']}/models", "image/png": "iVBOR/root/xx"}},
    ]}], "metadata": {"papermill": {"input_path": f"{repo_root()}/notebooks/x.ipynb"}}}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    tutorial.scrub_executed(path)
    out = json.loads(path.read_text())
    text = json.dumps(out["cells"][0]["outputs"][0]) + json.dumps(out["metadata"])
    assert home not in text and str(repo_root()) not in text
    assert "~/logs/a.log" in text and "./build" in text
    assert out["cells"][0]["outputs"][1]["data"]["text/markdown"] == "$KTUTORIAL_HOME/models"
    assert out["cells"][0]["outputs"][1]["data"]["image/png"] == "iVBOR/root/xx"  # images untouched


def test_a_failing_notebook_stops_the_run_naming_cell_and_error(tmp_path, monkeypatch):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from ktutorial.errors import UserError

    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    params = new_code_cell('profile = "tiny"\nout_dir = "build"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell("x = 1"), new_code_cell("ratio = 1 / 0")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / "00_check_and_plan.ipynb")
    monkeypatch.setattr(tutorial, "repo_root", lambda: root)
    with pytest.raises(UserError) as err:
        tutorial.run_tutorial("tiny", tmp_path / "out", only=["00_check_and_plan"])
    message = str(err.value)
    assert "00_check_and_plan failed in code cell 3" in message and "'ratio = 1 / 0'" in message
    assert "ZeroDivisionError" in message and "00_check_and_plan.ipynb" in message


# ---- the CLI's refusals -------------------------------------------------------------------------


def test_tutorial_cli_refuses_a_bad_profile_or_notebook(tmp_path, capsys):
    from ktutorial.cli import main

    assert main(["tutorial", "--profile", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "tiny" in err
    assert main(["tutorial", "--only", "99_nothing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown notebook" in err and "00_check_and_plan" in err
    assert not (tmp_path / "notebooks").exists()  # refused before the first notebook


def test_docs_cli_without_executed_notebooks_names_the_fix(tmp_path, capsys):
    from ktutorial.cli import main

    assert main(["docs", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "ktutorial tutorial" in err and "00_check_and_plan" in err


# ---- the whole tutorial, end to end --------------------------------------------------------------


def _tiny_servers_of_this_home() -> list[psutil.Process]:
    """llama.cpp children started under this test session's KTUTORIAL_HOME, alive or zombie."""
    home = os.environ["KTUTORIAL_HOME"]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ktutorial.engines.llamacpp" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("KTUTORIAL_HOME") == home:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _newest_source_mtime() -> float:
    files = [*NB_DIR.glob("*.ipynb"), *(REPO / "ktutorial").rglob("*.py"), *(REPO / "docs").rglob("*"),
             REPO / "mkdocs.yml"]
    return max(p.stat().st_mtime for p in files if p.is_file())


@pytest.fixture(scope="module")
def tutorial_build(tmp_path_factory):
    reuse = os.environ.get("KTUTORIAL_TUTORIAL_BUILD")
    if reuse:
        out = Path(reuse).resolve()
        executed = [out / "notebooks" / f"{n}.ipynb" for n in NOTEBOOKS]
        missing = [p.name for p in executed if not p.is_file()]
        assert not missing, f"KTUTORIAL_TUTORIAL_BUILD={reuse} lacks {missing}: run `make tutorial`"
        assert (out / "site" / "index.html").is_file(), f"{reuse}/site is not built: run `make tutorial`"
        oldest = min(p.stat().st_mtime for p in executed)
        assert oldest >= _newest_source_mtime(), f"{reuse} is older than the sources: run `make tutorial` again"
        return out
    out = tmp_path_factory.mktemp("tutorial") / "build"
    result = tutorial.run_tutorial("tiny", out)
    assert [r.name for r in result.runs] == NOTEBOOKS
    import typer.main

    from ktutorial.cli import app
    from ktutorial.docs import build_site

    assert build_site(out, typer.main.get_command(app)) == (out / "site").resolve()
    # 02_launch left a server running for the later notebooks; the tutorial stopped it.
    assert [e["engine"] for e in result.stopped_servers] == ["llamacpp"]
    from ktutorial import server

    assert server.running() == []
    assert _tiny_servers_of_this_home() == []
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_notebook_has_no_errors_a_chart_and_the_stamp(tutorial_build, name):
    path = tutorial_build / "notebooks" / f"{name}.ipynb"
    assert tutorial.error_cells(path) == []
    nb = json.loads(path.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name}: no chart among its outputs"
    stamp = [o for o in outputs if "Environment stamp" in "".join(o.get("data", {}).get("text/markdown", ""))]
    assert stamp and "ktutorial_version" in "".join(stamp[-1]["data"]["text/markdown"])
    injected = [c for c in nb["cells"] if "injected-parameters" in _tags(c)]
    assert injected and 'out_dir = "."' in "".join(injected[0]["source"])
    text = path.read_text()
    assert str(Path.home()) + "/" not in text and str(REPO) not in text, f"{name}: a machine path in the outputs"


# What each notebook must show on the tiny profile: a helper that degraded to an empty or
# fallback output (a skipped parser check, a missing Claude Code CLI, a sweep that measured
# nothing) fails here, not only a cell that raised.
MUST_SHOW = {
    "00_check_and_plan": ["fits"],
    "01_download": ["9 of 9 files already here", "| ok | yes |"],
    "02_launch": ["refused before launch", "sglang-kt's own parser", "accepted the command"],
    "03_requests": ["Hello from the ktutorial tiny model.", "Done: the command ran and printed its output."],
    "04_tuning_sweeps": [" 0 failed combination(s).", "| concurrency |"],
    "05_claude_code": ["12 of 12 parts work", "its answer", "Done: the command ran"],
    "06_llamacpp_comparison": ["Measured here", "3/3", "predicted / published (error)", "Best through the engine: 14"],
    "07_inside_kt": ["32/32", "GPU half by `sglang_fused_moe_fp8`: latency falls monotonically"],
}
MUST_NOT_SHOW = ["is not installed here", "No sweep records"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_notebook_shows_what_it_is_for(tutorial_build, name):
    nb = json.loads((tutorial_build / "notebooks" / f"{name}.ipynb").read_text())
    shown = ""
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            shown += "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/markdown", ""))
    for needle in MUST_SHOW[name]:
        assert needle in shown, f"{name} does not show {needle!r}"
    for needle in MUST_NOT_SHOW:
        assert needle not in shown, f"{name} fell back: {needle!r}"


@pytest.mark.slow
def test_tutorial_wrote_records_and_figures(tutorial_build):
    from ktutorial import results

    records = results.load_records(tutorial_build / "records")
    kinds = {r["kind"] for r in records}
    assert {"bench", "agreement"} <= kinds
    assert all(r["env"].get("ktutorial_version") for r in records)
    figures = {p.name for p in (tutorial_build / "figures").glob("*.png")}
    assert {"plan_memory.png", "gpu_experts_tradeoff.png", "token_times.png", "hybrid_gpu_experts.png",
            "perfmodel_vs_published.png"} <= figures


@pytest.fixture(scope="module")
def site_url(tutorial_build):
    with chromium.serve(tutorial_build / "site") as url:
        yield url


def _browse(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of its top, from headless Chromium."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    shot = chromium.run("--window-size=1280,2400", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-800:]
    dom = chromium.dump_dom(url)
    # The page as a reader sees it: the theme's inline styles and scripts name "stderr" and
    # "Traceback" themselves, so they are left out of what is searched.
    return re.sub(r"<style.*?</style>|<script.*?</script>", "", dom, flags=re.S)


def _assert_tables_in_sight(site_url: str, page: str) -> None:
    for width in TABLE_WIDTHS_PX:
        got = chromium.clipped_tables(site_url, page, width)
        assert got["clipped"] == [], f"{page} at {width} px: tables cut or hidden: {got['clipped']}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_site_page_renders_the_executed_outputs_in_chromium(site_url, name):
    screenshot = SCREENSHOTS / f"{name}.png"
    dom = _browse(f"{site_url}/notebooks/{name}/", screenshot)
    assert screenshot.stat().st_size > 20_000, "the screenshot is (nearly) blank"
    # The executed outputs: an embedded chart and the environment stamp's table.
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom), f"{name}: no chart image on the page"
    assert "Environment stamp" in dom and "ktutorial_version" in dom and "kt_kernel_version" in dom
    assert "jp-RenderedMarkdown" in dom, f"{name}: no rendered markdown output"
    assert "Traceback" not in dom and not re.search(r'<div[^>]*data-mime-type="application/vnd.jupyter.stderr"', dom), \
        f"{name}: an error or stderr output on the page"
    _assert_tables_in_sight(site_url, f"/notebooks/{name}/")


@pytest.mark.slow
@pytest.mark.parametrize("page, must_show", [
    ("", "The two commands"),
    ("results/", "hybrid_gpu_experts.png"),
    ("reference/launch-parameters/", "--kt-num-gpu-experts"),
    ("reference/troubleshooting/", "CUDA out of memory"),
    ("reference/cli/", "ktutorial tutorial"),
    # the real engine: Claude Code's checks straight and through the proxy, from the host's records
    ("results/gpu-host/", "sglang-kt minimax-append-think, via proxy"),
    ("results/gpu-host/notebooks/05_claude_code/", "12 of 12 parts work"),
])
def test_site_home_results_and_reference_render(site_url, page, must_show):
    dom = _browse(f"{site_url}/{page}", SCREENSHOTS / f"page-{page.strip('/').replace('/', '-') or 'home'}.png")
    assert must_show in dom
    assert not re.search(r'(src|href)="https?://(?!127\.0\.0\.1)[^"]+\.(js|css|woff2?)"', dom), "a page loads from the network"
    _assert_tables_in_sight(site_url, f"/{page}")


@pytest.mark.slow
def test_site_tables_were_cut_without_the_tables_stylesheet(site_url):
    """The negative control on the real site: measured without docs/stylesheets/tables.css, wide
    tables whose words fit the column side by side hide columns behind a scrollbar at a laptop's
    width (the theme holds each header cell at 5rem at the least)."""
    for page, header in (("/notebooks/05_claude_code/", "what Claude Code sends | works | seen | fix"),
                         ("/notebooks/07_inside_kt/", "GPU experts / layer | uniform")):
        before = chromium.clipped_tables(site_url, page, 1280, without=("stylesheets/tables.css",))
        assert any(c["header"].startswith(header) and "could wrap to fit" in c["problem"] for c in before["clipped"]), \
            f"{page}: the probe saw no cut table without the fix: {before}"
        assert chromium.clipped_tables(site_url, page, 1280)["clipped"] == []


# One page, four tables: each of the probe's verdicts, and a table it must leave alone.
PROBE_CONTROL_PAGE = """<!doctype html><html><head><style>
  body { margin: 0; } article { width: 500px; }
  td { padding: 4px; } .nowrap td { white-space: nowrap; }
</style></head><body><article>
<div style="overflow: hidden; width: 300px"><table class="nowrap"><tr><td>clipped</td><td>{words}</td></tr></table></div>
<table class="nowrap"><tr><td>past</td><td>{words}</td></tr></table>
<div style="overflow-x: auto"><table class="nowrap"><tr><td>scrolled</td><td>{words}</td></tr></table></div>
<div style="overflow-x: auto"><table><tr><td>unbreakable</td><td>{long_word}</td></tr></table></div>
</article></body></html>"""


def test_table_probe_catches_cut_tables_and_leaves_scrolling_ones(tmp_path):
    page = PROBE_CONTROL_PAGE.replace("{words}", "a wide cell of words " * 12).replace("{long_word}", "x" * 200)
    (tmp_path / "control.html").write_text(page)
    with chromium.serve(tmp_path) as url:
        got = chromium.clipped_tables(url, "/control.html", 800)
    assert got["tables"] == 4
    problems = {c["table"]: c["problem"] for c in got["clipped"]}
    assert problems[0].startswith("cut at the edge of <div"), problems
    assert problems[1].startswith("wider than the content area with nothing to scroll it"), problems
    assert problems[2].startswith("hidden behind a scrollbar though it could wrap to fit"), problems
    assert 3 not in problems, "a table whose one word is wider than the page can only scroll"
