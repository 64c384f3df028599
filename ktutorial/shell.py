"""A command as shell text a reader can copy: quoted as shlex does, with no path of this machine.

Two departures from `shlex.join`: an interpreter's absolute path (this one, or any `.../python3.11`)
shows as `python`, and a leading `~/` stays unquoted so the reader's shell expands it.
Server launches (`server.Launch.shell`), SGLang commands (`engines.sglang_kt.command_line`),
notebook command blocks and Claude Code's docs all render through `command_line`.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Optional, Sequence


def quote_arg(arg: str) -> str:
    """One argument of a command line: `python` for an interpreter, `~/` left to the shell."""
    if arg == sys.executable or (os.path.isabs(arg) and re.fullmatch(r"python[0-9.]*", os.path.basename(arg))):
        return "python"
    if arg.startswith("~/"):
        return "~/" + shlex.quote(arg[2:])
    return shlex.quote(arg)


def command_line(command: Sequence[str], env: Optional[dict[str, str]] = None, one_flag_a_line: bool = False) -> str:
    """`VAR=value ... cmd args`: one line, or with `one_flag_a_line` each `--flag` and its values on
    a line of its own (continued with a backslash), as a long launch command reads best."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    groups: list[list[str]] = [[]]
    for arg in command:
        if one_flag_a_line and arg.startswith("--") and groups[-1]:
            groups.append([])
        groups[-1].append(quote_arg(arg))
    body = " \\\n  ".join(" ".join(g) for g in groups)
    return (prefix + " " if prefix else "") + body
