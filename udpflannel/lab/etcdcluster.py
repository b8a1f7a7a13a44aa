"""A real etcd cluster of several members (three by default) for the tests: kill the leader, a
follower, or a quorum, and bring them back.

::

    with EtcdCluster(["127.0.0.1"] * 3) as etcd:            # loopback, free ports, one data dir each
        etcd.ctl("put", "/coreos.com/network/config", "...")  # etcdctl against every member
        SubnetManager(EtcdOptions(etcd.endpoint), ...)        # "http://127.0.0.1:P1,http://127.0.0.1:P2,..."
        leader = etcd.leader(); leader.kill(); ...; etcd.restart(leader)

With ``netns=`` every member runs in that namespace; :func:`on_hub` puts them on addresses of the
lab's hub bridge (``udpflannel.lab.cluster.Cluster(..., etcd_members=3)``). Each member is a
:class:`~udpflannel.lab.etcd.EtcdServer`; a killed member restarts on its own data directory and
rejoins. Not thread-safe; use from one thread.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence

from udpflannel.errors import SetupError
from udpflannel.lab.etcd import EtcdServer, StartedInWith
from udpflannel.lab.netns import UNDERLAY, Netns

QUORUM_KEY = "/udpflannel-lab/quorum-probe"
FIRST_MEMBER_HOST = 241  # members on the hub's bridge at 198.18.0.241, .242, ...: nodes stay below


def on_hub(hub: Netns, members: int = 3) -> EtcdCluster:
    """A cluster whose members listen on addresses of their own on the hub's bridge (added here), so
    each can be killed alone, and daemons name all of them in ``--etcd-endpoints``."""
    hosts = [str(UNDERLAY.network_address + FIRST_MEMBER_HOST + i) for i in range(members)]
    for host in hosts:
        hub.ip("addr", "add", f"{host}/{UNDERLAY.prefixlen}", "dev", "br0")
    return EtcdCluster(hosts, netns=hub.name)


class EtcdCluster(StartedInWith):
    def __init__(self, hosts: Sequence[str], *, netns: str | None = None) -> None:
        if len(hosts) < 2:
            raise ValueError("a cluster needs at least two members; use EtcdServer for one")
        token = secrets.token_hex(4)
        self.members = [
            EtcdServer(host=host, netns=netns, name=f"udpflannel-lab-{token}-m{i}",
                       extra_args=("--initial-cluster-token", f"udpflannel-lab-{token}"))
            for i, host in enumerate(hosts, 1)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Every member's client URL, comma-separated: what ``--etcd-endpoints`` takes."""
        return ",".join(m.endpoint for m in self.members)

    def member_at(self, endpoint: str) -> EtcdServer:
        return next(m for m in self.members if m.endpoint == endpoint)

    # -- process control ---------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member that is not running and wait for a quorum; bounded by ``timeout``."""
        return self.restart(*self.members, timeout=timeout)

    def restart(self, *members: EtcdServer, timeout: float = 30.0) -> EtcdCluster:
        """Start ``members`` (on their data dirs) together, then wait until each answers and, if a
        majority now runs, until the cluster commits requests."""
        for m in members:
            if not m.running:
                m.launch()
        deadline = time.monotonic() + timeout
        for m in members:
            m.wait_healthy(max(1.0, deadline - time.monotonic()))
        if self.has_majority():
            self.wait_quorum(max(1.0, deadline - time.monotonic()))
        return self

    def has_majority(self) -> bool:
        return sum(m.running for m in self.members) > len(self.members) // 2

    def wait_quorum(self, timeout: float = 30.0) -> None:
        """Until a linearizable read succeeds (a leader is elected and a majority answers it)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.ctl("get", QUORUM_KEY, timeout=5)
                return
            except SetupError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise SetupError(f"the etcd cluster has no quorum after {timeout:.0f} s: {last}")

    def close(self) -> None:
        errors = []
        for m in self.members:
            try:
                m.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- roles ---------------------------------------------------------------------------------------------

    def status(self, member: EtcdServer) -> dict:
        """``etcdctl endpoint status`` of one member: its ``member_id``, the ``leader`` it knows (0: none)."""
        out = json.loads(member.ctl("endpoint", "status", "-w", "json", timeout=5))[0]["Status"]
        return {"member_id": int(out["header"]["member_id"]), "leader": int(out.get("leader", 0)),
                "raft_term": int(out.get("raftTerm", 0))}

    def leader(self) -> EtcdServer:
        """The member every running member agrees leads (waits up to 10 s for an election to settle)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                ids = {m.name: self.status(m) for m in self.members if m.running}
                leaders = {s["leader"] for s in ids.values()}
                if len(leaders) == 1 and 0 not in leaders:
                    (leader_id,) = leaders
                    name = next(n for n, s in ids.items() if s["member_id"] == leader_id)
                    return next(m for m in self.members if m.name == name)
            except (SetupError, StopIteration, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise SetupError("the etcd members do not agree on a leader")
            time.sleep(0.1)

    def followers(self) -> list[EtcdServer]:
        leader = self.leader()
        return [m for m in self.members if m is not leader and m.running]

    # -- etcdctl -------------------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 10, input: str | None = None) -> str:
        """``etcdctl`` with every member as an endpoint (it uses whichever answers)."""
        live = next((m for m in self.members if m.running), self.members[0])
        return live.ctl(*args, timeout=timeout, input=input, endpoints=self.endpoint)

    def revision(self) -> int:
        return int(json.loads(self.ctl("get", QUORUM_KEY, "-w", "json"))["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        rev = revision if revision is not None else self.revision()
        self.ctl("compact", str(rev), "--physical")
        return rev

    def leases(self) -> set[int]:
        """Every etcd lease the cluster holds now (``etcdctl lease list``)."""
        out = json.loads(self.ctl("lease", "list", "-w", "json"))
        return {int(lease["id"]) for lease in out.get("leases") or []}
