"""The `ktutorial` command: a thin layer over the modules. Each command parses its options,
calls one library function, and prints the result (a table, or JSON with --json).

Library errors that a reader can fix (bad input, a missing file, a busy port) derive from
`ktutorial.errors.UserError`; they print as one line with the fix and exit 2, not a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console

from ktutorial.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly.",
)
console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """JSON on stdout, nothing else: scripts pipe it."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ==== section: foundation (spec, tiny, selftest) ===========================================
@app.command()
def version() -> None:
    """Print ktutorial's version."""
    from ktutorial import __version__

    print(__version__)


# ==== end section: foundation ===============================================================

# ==== section: check, plan and fetch (hardware, plan, doctor, download, verify) ============
# ==== end section: check, plan and fetch ====================================================

# ==== section: serve and talk (serve, stop, status, chat) ==================================
# ==== end section: serve and talk ===========================================================

# ==== section: measure (bench, sweep, kernel-bench, report) ================================
# ==== end section: measure ==================================================================

# ==== section: claude code (claude-code settings|check|run) ================================
# ==== end section: claude code ==============================================================

# ==== section: inside kt (hybrid) ===========================================================
# ==== end section: inside kt ================================================================

# ==== section: tutorial (tutorial, docs) ====================================================
# ==== end section: tutorial =================================================================


@app.callback()
def _root() -> None:
    """Serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly."""


def main(argv: Optional[list[str]] = None) -> int:
    try:
        # standalone mode: click prints usage errors and turns typer.Exit into exit codes.
        app(args=argv, prog_name="ktutorial")
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
