"""The ktutorial command run in-process, as the tests call it: its exit status, stdout and stderr."""

from __future__ import annotations

from ktutorial.cli import main


def run_cli(args, capsys, flat_err: bool = False):
    """`flat_err`: stderr with its whitespace collapsed (rich wraps long messages at the terminal's width)."""
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, " ".join(out.err.split()) if flat_err else out.err
