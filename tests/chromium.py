"""Headless Chromium for the tests that look at pages as a reader does (the site, JupyterLab).

- `run(*args)`: one Chromium run with the project's flags (no network of its own, a fresh profile);
- `dump_dom(url)`: the page's DOM after its scripts ran;
- `serve(folder)`: a folder on 127.0.0.1, with the table probe beside its files;
- `clipped_tables(base_url, page, width_px)`: every table of the page whose content a reader
  cannot see (see PROBE_SCRIPT). The page is loaded in a frame of the probe page, served from the
  same origin, `width_px` wide, and measured there after its scripts and styles settled.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def executable() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is needed to check the pages: apt-get install chromium (.ci/run does)")


def run(*args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    # A headless Chromium now and then never exits on a loaded 2-core machine (seen once in a
    # CI run, 120 s on a page that renders in 2): a fresh profile and one more try, then fail.
    exe = executable()
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="ktutorial-chromium-") as profile_dir:
            try:
                return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile_dir}",
                                       f"--virtual-time-budget={budget_ms}", *args],
                                      check=False, capture_output=True, text=True, timeout=90)
            except subprocess.TimeoutExpired:
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def dump_dom(url: str, budget_ms: int = 5000, window: str = "1280,2400") -> str:
    done = run(f"--window-size={window}", "--dump-dom", url, budget_ms=budget_ms)
    assert done.returncode == 0, done.stderr[-800:]
    return done.stdout


# Measures each table of the framed page. Its content must be in sight: not cut by a clipping
# ancestor (overflow hidden or clip), not wider than the content area with nothing to scroll it,
# and not hidden behind a scrollbar unless its words cannot fit side by side in the space it has
# (then scrolling is the only way to read it; on a phone that is most wide tables).
PROBE_SCRIPT = r"""
const params = new URLSearchParams(location.search);
const frame = document.getElementById('page');
frame.style.width = params.get('width') + 'px';
frame.onload = () => setTimeout(() => {
  const doc = frame.contentDocument, win = frame.contentWindow;
  for (const href of (params.get('without') || '').split(',').filter(Boolean)) {
    for (const link of doc.querySelectorAll('link[rel=stylesheet]')) {
      if (link.getAttribute('href').endsWith(href)) link.remove();
    }
  }
  const px = (n) => Math.round(n) + ' px';
  // The narrowest the table's words allow, side by side: its min-content width with no cell held
  // wider or unwrapped by a stylesheet (the theme gives header cells 5rem) and no word broken.
  const minContent = (table) => {
    const probe = doc.createElement('style');
    // A table asked to be 1 px wide gets as narrow as its layout lets it: its words side by side.
    probe.textContent = '[data-ktutorial-narrowest] { display: table !important; width: 1px !important; ' +
      'max-width: none !important; } ' +
      '[data-ktutorial-narrowest] th, [data-ktutorial-narrowest] td, [data-ktutorial-narrowest] td * ' +
      '{ min-width: 0 !important; overflow-wrap: normal !important; word-break: normal !important; } ' +
      '[data-ktutorial-narrowest] th, [data-ktutorial-narrowest] td { white-space: normal !important; }';
    doc.head.appendChild(probe);
    table.setAttribute('data-ktutorial-narrowest', '');  // an attribute: a class would unmatch table:not([class])
    const width = table.getBoundingClientRect().width;
    table.removeAttribute('data-ktutorial-narrowest');
    probe.remove();
    return width;
  };
  const area = doc.querySelector('article') || doc.body;
  const areaBox = area.getBoundingClientRect();
  const found = [];
  const tables = Array.from(doc.querySelectorAll('table'));
  tables.forEach((table, index) => {
    const box = table.getBoundingClientRect();
    if (box.width === 0) return;  // not shown (a collapsed block)
    // The table's full content: its box, and more when the table element scrolls its own rows.
    const right = box.right + Math.max(0, table.scrollWidth - table.clientWidth);
    let problem = null, scrolls = false, held = false;
    for (let el = table; el && el !== doc.documentElement && !problem && !scrolls; el = el.parentElement) {
      const overflow = win.getComputedStyle(el).overflowX;
      if (overflow === 'visible') continue;
      const edge = el.getBoundingClientRect().left + el.clientLeft + el.clientWidth;  // inside its borders
      if (el === table && right - box.right <= 1) continue;  // its rows fit its own box
      if (right <= edge + 1) {  // within this box: look further out
        held = held || overflow === 'auto' || overflow === 'scroll';
        continue;
      }
      const hidden = `${px(right - edge)} of ${px(right - box.left)} out of sight`;
      if (overflow === 'hidden' || overflow === 'clip') {
        problem = `cut at the edge of <${el.tagName.toLowerCase()} class="${el.className}">: ${hidden}`;
        break;
      }
      const narrowest = minContent(table), room = edge - box.left;
      if (narrowest <= room + 1) {
        problem = `hidden behind a scrollbar though it could wrap to fit: ${hidden} ` +
                  `(it can be ${px(narrowest)} wide, it has ${px(room)})`;
      }
      scrolls = true;  // too wide to wrap: scrolling is the way to read it
    }
    // A table held in a scrolling box (the theme's wrapper reaches a little past the text on purpose)
    // is in sight; one in none must keep within the content area.
    if (!problem && !scrolls && !held && right > areaBox.right + 1) {
      problem = `wider than the content area with nothing to scroll it: ${px(right - areaBox.right)} past it`;
    }
    if (problem) {
      const head = Array.from(table.querySelectorAll('th')).map(th => th.textContent.trim()).join(' | ');
      found.push({table: index, header: head.slice(0, 120), problem});
    }
  });
  const out = document.createElement('pre');
  out.id = 'ktutorial-clipped';
  out.textContent = JSON.stringify({tables: tables.length, clipped: found});
  document.body.appendChild(out);
}, 1000);
frame.src = params.get('page');
"""
PROBE_PAGE = ("<!doctype html><html><body style='margin:0'><iframe id='page' style='height:2000px;border:0'>"
              "</iframe><script>" + PROBE_SCRIPT + "</script></body></html>")


PROBE_PATH = "/__ktutorial_table_probe.html"


@contextlib.contextmanager
def serve(folder: Path):
    """`folder` over http on 127.0.0.1 (the site's search needs http, not file://), and the table
    probe at PROBE_PATH; yields the base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.split("?")[0] != PROBE_PATH:
                return super().do_GET()
            body = PROBE_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def clipped_tables(base_url: str, page: str, width_px: int, without: tuple[str, ...] = ()) -> dict:
    """{"tables": count, "clipped": [{table, header, problem}]} for `page` (a path under
    `base_url`, which `serve` serves) framed `width_px` wide. `without`: stylesheets (by the end
    of their href) to leave out, to measure a page as it was before a fix."""
    query = urllib.parse.urlencode({"page": page, "width": width_px, "without": ",".join(without)})
    dom = dump_dom(f"{base_url}{PROBE_PATH}?{query}", budget_ms=10000, window=f"{width_px + 40},2000")
    found = re.search(r'<pre id="ktutorial-clipped">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the probe measured nothing on {page} (did the page load?)"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))
