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
    """Turn our own errors (bad files, bad options) and the system's (disk full, permission
    denied, out of memory) into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (EdgecoreError, ValueError, FileExistsError) as exc:
            echo_error(str(exc))
            raise typer.Exit(code=2) from None
        except OSError as exc:
            echo_error(describe_os_error(exc, kwargs.get("output")))
            raise typer.Exit(code=2) from None
        except MemoryError:
            echo_error("out of memory; nothing was written (try a smaller --batch-size or fewer/smaller images)")
            raise typer.Exit(code=2) from None

    return wrapper


def describe_os_error(exc: OSError, output: object = None) -> str:
    """``PATH: No space left on device`` — the file the system refused, and why.

    A write or fsync that fails on a full disk raises an OSError without a file
    name; then the command's ``-o/--output`` (what it was writing) is named.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else output
    if where is None:
        return reason if exc.errno is None else f"{reason} (errno {exc.errno})"
    text = f"{where}: {reason}"
    if exc.filename2 is not None:
        text += f" (while moving it to {exc.filename2})"
    return text


def echo_error(message: str) -> None:
    """One red ``error: …`` line on stderr."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def echo_err(message: str) -> None:
    """A plain progress/warning line on stderr (stdout stays machine-readable)."""
    typer.echo(message, err=True)
