"""Helpers shared by the camera CLI and the host CLI (torch-free).

Both command lines report a user's mistake the same way: one ``error:`` line that
names the file or option, and exit code 2 — never a traceback.
"""
from __future__ import annotations

import functools
from typing import Callable

import typer

from edgecore.runtime.errors import EdgecoreError


def friendly(command: Callable) -> Callable:
    """Turn our own errors (bad files, bad options) into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (EdgecoreError, ValueError, FileExistsError) as exc:
            echo_error(str(exc))
            raise typer.Exit(code=2) from None

    return wrapper


def echo_error(message: str) -> None:
    """One red ``error: …`` line on stderr."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def echo_err(message: str) -> None:
    """A plain progress/warning line on stderr (stdout stays machine-readable)."""
    typer.echo(message, err=True)
