"""Make a running daemon's lease move to another subnet, as an operator or another node could."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

from lease.records import encode_lease_value, make_subnet_key
from tests.cluster import wait_for
from udpflannel.lab.cluster import PREFIX, Cluster

SQUATTER = "198.18.0.200"  # a PublicIP no node of the lab has


def node_subnet(cluster: Cluster, index: int) -> IPv4Network:
    return IPv4Interface(cluster.nodes[index].env()["FLANNEL_SUBNET"]).network


def move_lease(cluster: Cluster, index: int, *, timeout: float = 20) -> tuple[IPv4Network, IPv4Network]:
    """Overwrite node ``index``'s key with another PublicIP's record (no etcd lease, so it stays).

    The daemon sees its key taken over, re-acquires, finds its old subnet held by the squatter and
    leases another one; returns (old, new) once subnet.env says so.
    """
    old = node_subnet(cluster, index)
    cluster.etcd.ctl("put", make_subnet_key(PREFIX, old), encode_lease_value(SQUATTER).decode())
    new = wait_for(lambda: (s := node_subnet(cluster, index)) != old and s, timeout=timeout,
                   what=f"node {index} leaving {old} for another subnet")
    return old, new
