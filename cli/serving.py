"""Where and for whom ``superdiff app`` serves: the address checked before the model loads, the
logins of ``--auth`` / ``--auth-file`` (gradio's own ``launch(auth=...)``), and the warning printed
when the app is reachable from other machines.

The app runs jobs on this machine and hands out every run's files, so it serves on 127.0.0.1 by
default; ``--host`` with any other address opens it to the network, which the warning says.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Sequence

from .errors import BadInput

__all__ = ["Login", "parse_logins", "serving_port", "is_loopback", "network_warning"]

Login = tuple[str, str]  # (user, password), as gradio's launch(auth=[...]) takes them


def _login(value: str, where: str) -> Login:
    """One USER:PASSWORD; bad input naming ``where`` and what is wrong, never echoing the password."""
    user, colon, password = value.partition(":")
    if not colon:
        raise BadInput(f"{where} has no ':'; write USER:PASSWORD (the user name cannot hold ':')")
    if not user.strip():
        raise BadInput(f"{where} has an empty user name; write USER:PASSWORD")
    if not password:
        raise BadInput(f"{where} gives user {user.strip()!r} an empty password; write USER:PASSWORD")
    return user.strip(), password  # gradio strips the name typed at its login, so it is stripped here too


def parse_logins(values: Sequence[str], auth_file: Path | None) -> list[Login]:
    """The logins of ``--auth USER:PASSWORD`` (repeated) and ``--auth-file`` (one USER:PASSWORD a
    line; blank lines and lines starting with # skipped, each line's surrounding whitespace dropped);
    bad input (exit 2) for a malformed one or a user named twice."""
    logins = [_login(value, f"--auth value {i + 1}") for i, value in enumerate(values)]
    if auth_file is not None:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"--auth-file {str(auth_file)!r} cannot be read ({exc}); pass a UTF-8 text file of "
                           "USER:PASSWORD lines") from None
        numbered = [(n, line.strip()) for n, line in enumerate(lines, 1)]
        logins += [_login(line, f"--auth-file {str(auth_file)!r} line {n}")
                   for n, line in numbered if line and not line.startswith("#")]
        if not logins:
            raise BadInput(f"--auth-file {str(auth_file)!r} holds no USER:PASSWORD line; add one")
    users = [user for user, _ in logins]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        raise BadInput(f"the logins name user {', '.join(map(repr, twice))} more than once; give each user one "
                       "password")
    return logins


def _address(host: str, port: int) -> tuple[int, tuple]:
    """The one (family, socket address) a server on ``host:port`` binds, as uvicorn (gradio's server)
    picks it: IPv6 where the host holds ':' (brackets dropped, as gradio drops them), else IPv4,
    the first address the name resolves to. Raises ``socket.gaierror`` for a name that does not resolve."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    info = socket.getaddrinfo(bare, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    return info[0], info[4]


def _bind_problem(host: str, port: int) -> tuple[int, str] | None:
    """Whether a server could listen on ``host:port`` (port 0: any free port), tried as the server
    binds (SO_REUSEADDR); (errno, reason) where it could not."""
    try:
        family, address = _address(host, port)
    except socket.gaierror as exc:
        return exc.errno, exc.strerror or str(exc)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        return exc.errno or 0, exc.strerror or str(exc)
    return None


def _port_problem(host: str, port: int) -> tuple[int, str] | None:
    """Whether ``port`` is free on ``host`` and on 127.0.0.1, which gradio binds first to test a port."""
    return _bind_problem("127.0.0.1", port) or _bind_problem(host, port)


def serving_port(host: str, port: int | None, first: int = 7860, count: int = 100) -> int:
    """The port to serve on, checked before anything is loaded: ``port`` if ``host:port`` is free,
    else bad input saying why (an address that is not this machine's, a port in use); without
    ``port``, the first free one of ``first … first + count - 1`` (gradio's range)."""
    hint = "use 127.0.0.1 (this machine only, the default), 0.0.0.0 (every network interface) or one of its addresses"
    problem = _bind_problem(host, 0)
    if problem is not None:
        code, reason = problem
        if code == errno.EADDRNOTAVAIL:
            raise BadInput(f"--host {host!r} is not an address of this machine ({reason}); {hint}")
        raise BadInput(f"--host {host!r} is neither an IP address nor a name that resolves here ({reason}); {hint}")
    if port is None:
        free = next((p for p in range(first, first + count) if _port_problem(host, p) is None), None)
        if free is None:
            raise BadInput(f"no port in {first}-{first + count - 1} is free on {host}; pass a free one with --port")
        return free
    problem = _port_problem(host, port)
    if problem is not None:
        code, reason = problem
        if code == errno.EADDRINUSE:
            raise BadInput(f"--port {port} is in use on {host} (another server is listening there); pass another "
                           f"--port, or leave it out to take the first free one from {first}")
        if code == errno.EACCES:
            raise BadInput(f"--port {port} on {host} needs more privileges than this user has ({reason}); use a "
                           f"port from 1024 up, e.g. --port {first}")
        raise BadInput(f"--port {port} on {host} cannot be served ({reason}); pass another --port")
    return port


def is_loopback(host: str) -> bool:
    """Whether the address a server on ``host`` binds is a loopback address (127.0.0.0/8, ::1): only
    this machine can reach it there. 0.0.0.0 and :: (every interface) are not."""
    try:
        return ipaddress.ip_address(str(_address(host, 0)[1][0]).split("%")[0]).is_loopback
    except (socket.gaierror, ValueError):
        return False


def network_warning(host: str, port: int, logins: Sequence[Login]) -> str | None:
    """The warning for serving on a host other machines can reach, or None on a loopback one: what
    anyone on the network can do there, and how to close it."""
    if is_loopback(host):
        return None
    tunnel = f"ssh -L {port}:127.0.0.1:{port} THIS-MACHINE"
    if not logins:
        return (f"Warning: --host {host} serves the app to the network, with no login: anyone who can reach this "
                f"machine on port {port} can run jobs on it and download every run's images and sidecars. Serve "
                f"on 127.0.0.1 (the default) and reach it through an SSH tunnel ({tunnel}), or ask for a login "
                "with --auth USER:PASSWORD or --auth-file PATH.")
    return (f"Warning: --host {host} serves the app to the network over plain HTTP: the login keeps others from "
            "running jobs and reading runs, but passwords and images cross the network unencrypted. On a network "
            f"you do not trust, serve on 127.0.0.1 (the default) and reach it through an SSH tunnel ({tunnel}).")
