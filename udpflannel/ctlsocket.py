"""Claiming the control socket's path without ever taking it from a running daemon.

A socket file that still accepts connections belongs to a running daemon: starting another one on the
same path is refused with a message naming the path and ``--control-socket``. Only a stale file (the
socket of a daemon that died without cleaning up: connecting is refused) is replaced.

The socket is bound under a temporary name in the same directory and then hard-linked to the path.
``link(2)`` fails with EEXIST instead of replacing, so of two daemons started at the same moment exactly
one gets the path, and the other finds it live (it already listens) and is refused; neither sees
EADDRINUSE. On exit, :func:`release` removes the path only if it is still our socket (same inode):
a path another daemon took over after ours was moved away is left alone.

A unix socket address holds at most 107 bytes of path. A longer path (a deep working directory) is
reached through an ``O_PATH`` handle on its directory, as ``/proc/self/fd/N/name``: the kernel resolves
that name like any other, so bind and connect work on the real file (:func:`reachable`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Iterator

from udpflannel.errors import SetupError

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
NAME_MAX = SUN_PATH_MAX - len("/proc/self/fd/2147483647/")  # the file name, for a path of any length
PROBE_TIMEOUT = 1.0
ATTEMPTS = 3  # a stale file removed meanwhile by someone else, or re-created: look again


@contextlib.contextmanager
def reachable(path: str | os.PathLike) -> Iterator[str]:
    """An address for ``bind``/``connect`` that names ``path``: the path itself when it fits in a
    socket address, else ``/proc/self/fd/N/<name>`` through a handle on its directory, open only while
    the caller binds or connects. OSError ENAMETOOLONG if even the file name alone does not fit."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        address = f"/proc/self/fd/{fd}/{name}"
        if len(os.fsencode(address)) > SUN_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"the socket's file name {name!r} is too long for a unix socket "
                                              f"address even through its directory")
        yield address
    finally:
        os.close(fd)


def claim(path: str, *, flag: str = "--control-socket", backlog: int = 16) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket bound at ``path``, and its (device, inode) for :func:`release`."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with reachable(temporary) as address:
                sock.bind(address)
            os.chmod(temporary, 0o600)
            sock.listen(backlog)
            st = os.stat(temporary)
            for _ in range(ATTEMPTS):
                try:
                    os.link(temporary, path)
                    break
                except FileExistsError:
                    _remove_if_stale(path, flag)
            else:
                raise SetupError(f"control socket {path} keeps being re-created by someone else; "
                                 f"choose another path with {flag}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot create the control socket {path}: {exc.strerror or exc}; "
                         f"choose another path with {flag}") from exc
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def release(path: str, identity: tuple[int, int]) -> bool:
    """Remove ``path`` if it is still the socket :func:`claim` made; True if it was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) != identity:
        log.info("control socket %s now belongs to someone else: left in place", path)
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def _remove_if_stale(path: str, flag: str) -> None:
    """Refuse (SetupError) if ``path`` is live or not a socket; unlink it if nobody listens on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # gone meanwhile: link again
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(f"{path} exists and is not a socket; remove it or choose another path with {flag}")
    if _answers(path):
        raise SetupError(f"control socket {path} belongs to a running daemon (it accepts connections); "
                         f"stop that daemon or give this one another path with {flag}")
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # still the file we found dead
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed the stale control socket %s (nothing listened on it)", path)


def _answers(path: str) -> bool:
    """Does something accept connections on ``path``? A full backlog or a slow accept counts as yes."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        with reachable(path) as address:
            probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True
    finally:
        probe.close()
    return True
