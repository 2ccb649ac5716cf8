"""How the CLI turns failures into exit codes: 2 for bad input, 1 for runtime failures, 130 for Ctrl-C."""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings
from typing import Any, Callable, Iterator

import click

from superdiff._text import escape_invisible

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class BadInput(click.UsageError):
    """A user's mistake: exit code 2, a message naming the problem and the fix, no traceback. The
    message's invisible characters (zero-width, controls; not its own newlines) are escaped as
    ``repr`` writes them, so text a user typed is shown as typed."""

    def __init__(self, message: str, ctx: click.Context | None = None) -> None:
        super().__init__(escape_invisible(message, keep="\n"), ctx)


class CommandFailed(RuntimeError):
    """A runtime failure whose message already says what failed and why (e.g. which file could not
    be written): printed as is, without the exception's type name, exit code 1."""


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the library's warnings about a run's correctness
    (:class:`superdiff.particles.WeightCollapseWarning`), every one however often it came before, into the
    yielded list; anything else is shown as Python would have shown it."""
    from superdiff.particles import WeightCollapseWarning

    messages: list[str] = []
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", WeightCollapseWarning)
            yield messages
    finally:  # outside the recording: there showwarning would append to ``caught`` as it is read
        for w in caught:
            if issubclass(w.category, WeightCollapseWarning):
                messages.append(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def surface_warnings(where: str = "") -> Iterator[list[str]]:
    """:func:`recorded_warnings`, each printed on stderr as ``Warning: …`` (``where`` names the sweep item)
    whatever ``--quiet`` says; yields the list of their messages (a sidecar may record them)."""
    messages: list[str] = []
    try:
        with recorded_warnings() as messages:
            yield messages
    finally:  # a run that then fails still shows what it warned
        for message in messages:
            click.echo(f"Warning{where}: {escape_invisible(message)}", err=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library ``ValueError``s to exit 2, Ctrl-C to exit 130 and other exceptions to exit 1 with
    a one-line cause.

    ``--debug`` on the group shows the traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().obj and ctx.find_root().obj.get("debug"))
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ValueError as exc:
            if debug:
                traceback.print_exc()
            raise BadInput(str(exc)) from exc
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            click.echo("Interrupted (Ctrl-C).", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except CommandFailed as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"Error: {escape_invisible(str(exc), keep=chr(10))}", err=True)
            ctx.exit(1)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                traceback.print_exc()
            click.echo(escape_invisible(f"Error: {type(exc).__name__}: {exc}".splitlines()[0]), err=True)
            ctx.exit(1)

    return wrapper
