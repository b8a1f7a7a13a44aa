"""lease.peers: route events from records; malformed input never removes a route (flanneld §5.3)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from lease.events import PeerAdded, PeerRemoved, Snapshot
from lease.peers import PeerTable

P = "/coreos.com/network"
S = f"{P}/subnets/"


def key(net: str) -> bytes:
    addr, plen = net.split("/")
    return f"{S}{addr}-{plen}".encode()


def val(ip: str) -> bytes:
    return b'{"PublicIP":"%s","PublicIPv6":null}' % ip.encode()


def added(net, ip):
    return PeerAdded(IPv4Network(net), IPv4Address(ip))


def table(own="10.5.1.0/24") -> PeerTable:
    t = PeerTable(P, IPv4Network(own))
    snap = t.reset([(key("10.5.1.0/24"), val("10.0.0.1")), (key("10.5.2.0/24"), val("10.0.0.2")),
                    (key("10.5.3.0/24"), val("10.0.0.3"))])
    assert snap == Snapshot((added("10.5.2.0/24", "10.0.0.2"), added("10.5.3.0/24", "10.0.0.3")))
    return t


def test_add_change_remove():
    t = table()
    assert t.put(key("10.5.4.0/24"), val("10.0.0.4")) == [added("10.5.4.0/24", "10.0.0.4")]
    assert t.put(key("10.5.4.0/24"), val("10.0.0.4")) == []  # a Go node's renewal: nothing changed
    assert t.put(key("10.5.4.0/24"), val("10.0.0.44")) == [added("10.5.4.0/24", "10.0.0.44")]
    assert t.delete(key("10.5.4.0/24")) == [PeerRemoved(IPv4Network("10.5.4.0/24"))]
    assert t.delete(key("10.5.4.0/24")) == []


def test_other_backends_records_are_routes():
    t = table()
    vx = b'{"PublicIP":"10.0.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    assert t.put(key("10.5.9.0/24"), vx) == [added("10.5.9.0/24", "10.0.0.9")]
    assert t.put(f"{S}10.5.10.0-24&fc00:0:0:1::-64", val("10.0.0.10")) == [added("10.5.10.0/24", "10.0.0.10")]


def test_malformed_records_remove_no_route():
    t = table()
    before = t.peers
    bad = [
        (f"{S}10.5.5.0-32", val("10.0.0.5")),
        (f"{S}garbage", val("10.0.0.5")),
        (f"{S}10.5.5.7-24", val("10.0.0.5")),  # host bits
        (key("10.5.5.0/24"), b"not json"),
        (key("10.5.5.0/24"), val("fc00::1")),
        (key("10.5.5.0/24"), b'{"PublicIPv6":null}'),  # no PublicIP
        (key("10.5.2.0/24"), b"{broken"),  # a bad update of a known peer keeps its route
    ]
    for k, v in bad:
        assert t.put(k, v) == []
        assert t.peers == before
    for k in (f"{S}10.5.5.0-32", f"{S}garbage", f"{S}10.5.5.7-24", key("10.5.5.0/24")):
        assert t.delete(k) == []
    assert t.peers == before
    assert t.ignored == len(bad) + 3


def test_resync_notices_changed_ips_vanished_peers_and_keeps_bad_values():
    t = table()
    t.put(key("10.5.4.0/24"), val("10.0.0.4"))
    snap = t.reset([
        (key("10.5.1.0/24"), val("10.0.0.1")),  # own
        (key("10.5.2.0/24"), val("10.0.0.22")),  # changed PublicIP
        (key("10.5.4.0/24"), b"oops"),  # now malformed: keeps the last good value
        (f"{S}10.5.99.0-32", val("10.0.0.99")),  # malformed key: ignored
        (key("10.5.6.0/24"), val("10.0.0.6")),  # new
    ])  # 10.5.3.0/24 vanished
    assert snap == Snapshot((
        added("10.5.2.0/24", "10.0.0.22"), added("10.5.4.0/24", "10.0.0.4"), added("10.5.6.0/24", "10.0.0.6"),
    ))


def test_own_subnet_excluded_and_moves():
    t = table()
    assert t.put(key("10.5.1.0/24"), val("10.0.0.1")) == []  # our own record
    # We re-acquired 10.5.3.0/24; 10.5.1.0/24 is someone else's record now.
    assert t.set_own(IPv4Network("10.5.3.0/24")) == [
        added("10.5.1.0/24", "10.0.0.1"), PeerRemoved(IPv4Network("10.5.3.0/24")),
    ]
    assert IPv4Network("10.5.3.0/24") not in t.peers


def test_duplicate_records_for_one_subnet_first_key_wins():
    t = table()
    dual = f"{S}10.5.2.0-24&fc00:0:0:2::-64"
    assert t.put(dual, val("10.0.0.77")) == []  # the plain key sorts first and still routes
    assert t.delete(key("10.5.2.0/24")) == [added("10.5.2.0/24", "10.0.0.77")]
    assert t.delete(dual) == [PeerRemoved(IPv4Network("10.5.2.0/24"))]


def test_a_record_naming_our_own_public_ip_is_not_routed():
    """flanneld routes a stale lease of its own (another subnet, its own PublicIP) to itself, a loop."""
    t = PeerTable(P, IPv4Network("10.5.1.0/24"), own_ip=IPv4Address("10.0.0.1"))
    assert t.reset([(key("10.5.1.0/24"), val("10.0.0.1")), (key("10.5.9.0/24"), val("10.0.0.1"))]) == Snapshot(())
    assert t.put(key("10.5.8.0/24"), val("10.0.0.1")) == []
    assert t.put(key("10.5.8.0/24"), val("10.0.0.8")) == [added("10.5.8.0/24", "10.0.0.8")]  # now someone else's
    assert t.put(key("10.5.8.0/24"), val("10.0.0.1")) == [PeerRemoved(IPv4Network("10.5.8.0/24"))]
    assert t.peers == {}
