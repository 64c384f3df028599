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
    help="Serve MiniMax-M2.1 with SGLang + KT-Kernel on one workstation, reproducibly.",
)
console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """JSON on stdout, nothing else: scripts pipe it."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ==== section: foundation (spec, tiny, selftest) ===========================================
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


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # click's own usage errors come through here
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise


if __name__ == "__main__":
    main()
