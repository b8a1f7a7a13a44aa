"""Hypothesis strategies for lease tests (networks, configs, existing leases) and slow references."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import strategies as st

from lease.config import NetworkConfig


@st.composite
def networks(draw, min_prefix: int = 0, max_prefix: int = 32) -> IPv4Network:
    """Any IPv4 network (host bits masked) with a prefix length in the given range."""
    plen = draw(st.integers(min_prefix, max_prefix))
    addr = draw(st.integers(0, 0xFFFFFFFF))
    return IPv4Network((addr, plen), strict=False)


@st.composite
def small_configs(draw) -> NetworkConfig:
    """Valid configs with at most a few hundred candidates, so slow references stay fast."""
    network = draw(networks(8, 26))
    subnet_len = draw(st.integers(network.prefixlen + 2, min(30, network.prefixlen + 8)))
    size = 1 << (32 - subnet_len)
    count = network.num_addresses // size
    lo = draw(st.integers(0, count - 1))
    hi = draw(st.integers(lo, count - 1))
    base = int(network.network_address)
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=IPv4Address(base + lo * size),
        subnet_max=IPv4Address(base + hi * size),
    )


@st.composite
def taken_subnets(draw, config: NetworkConfig) -> list[IPv4Network]:
    """Leases of any length in and around the config's network (other lengths, partial overlaps)."""
    net = config.network
    span = st.integers(int(net.network_address) - 4096, int(net.broadcast_address) + 4096).map(
        lambda a: max(0, min(a, 0xFFFFFFFF))
    )
    plens = st.integers(max(0, config.subnet_len - 3), min(32, config.subnet_len + 3))
    return draw(st.lists(st.builds(lambda a, p: IPv4Network((a, p), strict=False), span, plens), max_size=40))


def slow_candidates(config: NetworkConfig) -> list[IPv4Network]:
    """Every candidate from SubnetMin to SubnetMax, one by one, like flanneld's walk."""
    out, ip = [], int(config.subnet_min)
    while ip <= int(config.subnet_max):
        out.append(IPv4Network((ip, config.subnet_len)))
        ip += 1 << (32 - config.subnet_len)
    return out


def slow_free(config: NetworkConfig, taken: list[IPv4Network]) -> list[IPv4Network]:
    return [c for c in slow_candidates(config) if not any(c.overlaps(t) for t in taken)]
