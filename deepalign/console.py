"""Running a typer command line so that every refusal is one line: click's own usage errors
(an unknown option, a bad value) included, with exit 2 as click gives them."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from deepalign.errors import one_line


def run_app(app: typer.Typer, args: list[str] | None = None) -> NoReturn:
    """Run `app` and exit with its status; a usage error is one `error:` line and exit 2."""
    try:
        code = app(args=args, standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.TyperException as e:  # click's UsageError and BadParameter
        if not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        print(f"error: {one_line(e.format_message())}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
