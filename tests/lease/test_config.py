"""lease.config: the §2 examples, every error naming its field, and the default formulas by hypothesis."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lease.config import parse_network_config
from tests.lease.strategies import networks
from udpflannel.errors import ConfigError

# (input, SubnetLen, SubnetMin, SubnetMax, Port): the computed examples of the reference, §2.2.
EXAMPLES = [
    ('{"Network":"10.5.0.0/16"}', 24, "10.5.1.0", "10.5.255.0", 8285),
    ('{"network":"10.5.1.7/16","subnetlen":26}', 26, "10.5.0.64", "10.5.255.192", 8285),
    ('{"Network":"10.5.0.0/22"}', 24, "10.5.1.0", "10.5.3.0", 8285),
    ('{"Network":"10.5.0.0/23"}', 25, "10.5.0.128", "10.5.1.128", 8285),
    ('{"Network":"10.5.0.0/28"}', 30, "10.5.0.4", "10.5.0.12", 8285),
    ('{"Network":"10.5.0.0/16","SubnetLen":18}', 18, "10.5.64.0", "10.5.192.0", 8285),
    (
        '{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0",'
        '"Backend":{"Type":"udp","Port":7890}}',
        20, "10.10.0.0", "10.99.0.0", 7890,
    ),
]


@pytest.mark.parametrize("text,subnet_len,smin,smax,port", EXAMPLES)
def test_reference_examples(text, subnet_len, smin, smax, port):
    cfg = parse_network_config(text)
    assert (cfg.subnet_len, str(cfg.subnet_min), str(cfg.subnet_max), cfg.port) == (subnet_len, smin, smax, port)
    assert cfg.backend_type == "udp"


def test_host_bits_of_network_are_masked():
    assert parse_network_config('{"network":"10.5.1.7/16"}').network == IPv4Network("10.5.0.0/16")


# (config, field named in the error, words the message must contain)
ERRORS = [
    ('{"Network":"10.5.0.0/29"}', "Network", "too small"),
    ('{"Network":"10.5.0.0/16","SubnetLen":31}', "SubnetLen", "less than /31"),
    ('{"Network":"10.5.0.0/16","SubnetLen":17}', "SubnetLen", "at least four subnets"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}', "SubnetMin", "not in the range"),
    ('{"Network":"10.5.0.0/16","SubnetMax":"10.6.0.0"}', "SubnetMax", "not in the range"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.0.128"}', "SubnetMin", "boundary"),
    ('{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.1"}', "SubnetMax", "boundary"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.2.0"}', "SubnetMin", "above SubnetMax"),
    ("{}", "Network", "correct Network"),
    ('{"Network":"0.0.0.0/0"}', "Network", "correct Network"),
    ('{"Network":"fc00::/48"}', "Network", "IPv4 CIDR"),
    ('{"Network":"10.5.0.0"}', "Network", "IPv4 CIDR"),
    ('{"Network":16}', "Network", "CIDR string"),
    ('{"Network":"10.5.0.0/16","SubnetLen":"24"}', "SubnetLen", "integer"),
    ('{"Network":"10.5.0.0/16","SubnetLen":24.5}', "SubnetLen", "integer"),
    ('{"Network":"10.5.0.0/16","SubnetLen":-1}', "SubnetLen", "integer"),
    ('{"Network":"10.5.0.0/16","SubnetMin":"fc00::1"}', "SubnetMin", "IPv4"),
    ('{"Network":"10.5.0.0/16","SubnetMax":7}', "SubnetMax", "IPv4"),
    ('{"Network":"10.5.0.0/16","EnableIPv4":false}', "EnableIPv4", "needs IPv4"),
    ('{"Network":"10.5.0.0/16","EnableIPv6":"yes"}', "EnableIPv6", "true or false"),
    ('{"Network":"10.5.0.0/16","Backend":null}', "Backend.Type", "missing"),
    ('{"Network":"10.5.0.0/16","Backend":{}}', "Backend.Type", "missing"),
    ('{"Network":"10.5.0.0/16","Backend":{"Port":7890}}', "Backend.Type", "missing"),
    ('{"Network":"10.5.0.0/16","Backend":"udp"}', "Backend", "JSON object"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}', "Backend.Type", "not supported"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}', "Backend.Type", "not supported"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":1}}', "Backend.Type", "string"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":0}}', "Backend.Port", "between 1 and 65535"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":65536}}', "Backend.Port", "between 1 and 65535"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":-5}}', "Backend.Port", "between 1 and 65535"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":"8285"}}', "Backend.Port", "integer"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":8285.5}}', "Backend.Port", "integer"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":true}}', "Backend.Port", "integer"),
    ('{"Network":"10.5.0.0/16"', "config", "not valid JSON"),
    ('["Network"]', "config", "JSON object"),
]


@pytest.mark.parametrize("text,field,words", ERRORS)
def test_errors_name_the_field(text, field, words):
    with pytest.raises(ConfigError) as info:
        parse_network_config(text)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(f"{field}: ")


def test_keys_are_case_insensitive_and_unknown_keys_ignored():
    cfg = parse_network_config(
        '{"NETWORK":"10.5.0.0/16","sUbNeTlEn":25,"backend":{"TYPE":"UDP","port":9000},'
        '"BackendType":"vxlan","Whatever":[1,2]}'
    )
    assert (cfg.network, cfg.subnet_len, cfg.backend_type, cfg.port) == (IPv4Network("10.5.0.0/16"), 25, "udp", 9000)


def test_last_spelling_of_a_key_wins_like_encoding_json():
    cfg = parse_network_config('{"Network":"10.1.0.0/16","network":"10.2.0.0/16"}')
    assert cfg.network == IPv4Network("10.2.0.0/16")


def test_absent_backend_is_udp_8285_and_null_fields_are_defaults():
    cfg = parse_network_config('{"Network":"10.5.0.0/16","SubnetLen":null,"SubnetMin":"0.0.0.0","SubnetMax":null}')
    assert (cfg.backend_type, cfg.port, cfg.subnet_len) == ("udp", 8285, 24)
    assert (cfg.subnet_min, cfg.subnet_max) == (IPv4Address("10.5.1.0"), IPv4Address("10.5.255.0"))


def test_min_equal_max_is_allowed():
    cfg = parse_network_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.7.0","SubnetMax":"10.5.7.0"}')
    assert cfg.subnet_min == cfg.subnet_max


@given(networks(0, 32))
def test_defaults_follow_the_reference_formulas_for_every_prefix_length(network):
    text = json.dumps({"Network": str(network)})
    p = network.prefixlen
    if int(network.network_address) == 0 and p == 0:
        with pytest.raises(ConfigError, match="correct Network"):
            parse_network_config(text)
        return
    if p > 28:
        with pytest.raises(ConfigError, match="too small"):
            parse_network_config(text)
        return
    cfg = parse_network_config(text)
    subnet_len = 24 if p <= 22 else p + 2
    size = 2 ** (32 - subnet_len)
    assert cfg.network == network
    assert cfg.subnet_len == subnet_len
    assert int(cfg.subnet_min) == int(network.network_address) + size
    assert int(cfg.subnet_max) == int(network.network_address) + 2 ** (32 - p) - size


@given(networks(1, 32), st.integers(1, 32))
def test_explicit_subnet_len_rules(network, subnet_len):
    text = json.dumps({"Network": str(network), "SubnetLen": subnet_len})
    p = network.prefixlen
    if subnet_len > 30:
        with pytest.raises(ConfigError, match="less than /31"):
            parse_network_config(text)
    elif subnet_len < p + 2:
        with pytest.raises(ConfigError, match="four subnets"):
            parse_network_config(text)
    else:
        cfg = parse_network_config(text)
        size = 2 ** (32 - subnet_len)
        assert cfg.subnet_len == subnet_len
        assert int(cfg.subnet_min) == int(network.network_address) + size
        assert int(cfg.subnet_max) == int(network.broadcast_address) + 1 - size
        assert cfg.subnet_min <= cfg.subnet_max


@given(networks(8, 24), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_explicit_min_max_are_checked_in_order(network, a, b):
    smin, smax = IPv4Address(a), IPv4Address(b)
    text = json.dumps({"Network": str(network), "SubnetLen": 26, "SubnetMin": str(smin), "SubnetMax": str(smax)})
    try:
        cfg = parse_network_config(text)
    except ConfigError as e:
        assert e.field in ("SubnetMin", "SubnetMax")
        return
    assert cfg.network.network_address <= cfg.subnet_min <= cfg.subnet_max <= cfg.network.broadcast_address
    assert int(cfg.subnet_min) % 64 == 0 and int(cfg.subnet_max) % 64 == 0
