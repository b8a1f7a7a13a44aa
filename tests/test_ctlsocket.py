"""udpflannel.ctlsocket in-process: a live control socket is never taken over, a stale one is replaced,
and release removes only our own socket (issue 17 item 7). Paths under pytest's tmp_path only."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest

from udpflannel import ctlsocket
from udpflannel.errors import SetupError


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def test_a_live_socket_is_refused_with_the_path_and_the_flag_and_stays_in_place(tmp_path):
    path = tmp_path / "run" / "udpflannel.sock"
    first, identity = ctlsocket.claim(str(path))
    try:
        with pytest.raises(SetupError) as refused:
            ctlsocket.claim(str(path))
        assert str(path) in str(refused.value) and "--control-socket" in str(refused.value)
        assert "running daemon" in str(refused.value)
        st = path.stat()
        assert (st.st_dev, st.st_ino) == identity and accepts(path)
        assert oct(st.st_mode & 0o777) == oct(0o600)
        assert sorted(os.listdir(path.parent)) == ["udpflannel.sock"]  # no temporary name left behind
    finally:
        first.close()


def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "udpflannel.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: a daemon that was SIGKILLed
    assert path.exists() and not accepts(path)
    sock, identity = ctlsocket.claim(str(path))
    try:
        assert accepts(path)
        assert (path.stat().st_dev, path.stat().st_ino) == identity
    finally:
        sock.close()


def test_a_file_that_is_not_a_socket_is_refused_and_kept(tmp_path):
    path = tmp_path / "udpflannel.sock"
    path.write_text("someone's file")
    with pytest.raises(SetupError, match="not a socket"):
        ctlsocket.claim(str(path))
    assert path.read_text() == "someone's file"


def test_release_removes_our_socket_but_not_one_that_replaced_it(tmp_path):
    path = tmp_path / "udpflannel.sock"
    ours, identity = ctlsocket.claim(str(path))
    moved = tmp_path / "moved.sock"
    os.rename(path, moved)  # ours moved away (by hand, say), and another daemon took the path
    theirs, their_identity = ctlsocket.claim(str(path))
    try:
        assert ctlsocket.release(str(path), identity) is False
        assert accepts(path) and (path.stat().st_dev, path.stat().st_ino) == their_identity
        assert ctlsocket.release(str(path), their_identity) is True
        assert not path.exists()
    finally:
        ours.close()
        theirs.close()


def test_of_eight_simultaneous_claims_exactly_one_gets_the_path_and_the_others_are_refused(tmp_path):
    path = tmp_path / "udpflannel.sock"
    barrier = threading.Barrier(8)
    won: list[socket.socket] = []
    refused: list[str] = []
    other: list[BaseException] = []

    def contender() -> None:
        barrier.wait(timeout=10)
        try:
            won.append(ctlsocket.claim(str(path))[0])
        except SetupError as exc:
            refused.append(str(exc))
        except BaseException as exc:  # EADDRINUSE or anything else: the bug this guards against
            other.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    try:
        assert other == []
        assert len(won) == 1 and len(refused) == 7
        assert all("running daemon" in text for text in refused)
        assert accepts(path)
    finally:
        for s in won:
            s.close()


def deep_directory(tmp_path: Path) -> Path:
    """A directory whose socket paths are longer than a unix socket address holds (107 bytes), as a
    deep CI working directory makes them."""
    path = tmp_path / ("d" * 60) / ("e" * 60)
    path.mkdir(parents=True)
    return path


def test_a_socket_path_longer_than_a_socket_address_is_claimed_answered_and_refused_to_a_second_daemon(tmp_path):
    path = deep_directory(tmp_path) / "udpflannel.sock"
    assert len(os.fsencode(str(path))) > ctlsocket.SUN_PATH_MAX
    first, identity = ctlsocket.claim(str(path))
    try:
        assert (path.stat().st_dev, path.stat().st_ino) == identity
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, ctlsocket.reachable(path) as address:
            client.connect(address)
            conn, _ = first.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
        with pytest.raises(SetupError, match="running daemon"):
            ctlsocket.claim(str(path))
        assert sorted(os.listdir(path.parent)) == ["udpflannel.sock"]
    finally:
        first.close()
    assert ctlsocket.release(str(path), identity) and not path.exists()


def test_a_short_path_is_used_as_it_is():
    with ctlsocket.reachable("/run/flannel/udpflannel.sock") as address:
        assert address == "/run/flannel/udpflannel.sock"


def test_a_file_name_too_long_for_any_socket_address_is_refused_with_enametoolong(tmp_path):
    with pytest.raises(OSError) as refused, ctlsocket.reachable(tmp_path / ("n" * 100)):
        pass
    assert refused.value.errno == errno.ENAMETOOLONG and "too long" in str(refused.value)
