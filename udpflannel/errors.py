"""One exception family. Messages tell the user what to do; the CLI maps classes to exit codes.

Bad *packets* never raise: the sans-IO core returns a verdict instead (see ``udpflannel.packet``).
Exceptions are for configuration, set-up and control-plane failures.
"""

from __future__ import annotations


class UdpflannelError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with when this error ends the process."""

    exit_code = 1


class ConfigError(UdpflannelError):
    """A configuration value is wrong. ``field`` names it (a JSON key or a command-line flag)."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SetupError(UdpflannelError):
    """The node cannot be set up (no interface, TUN creation failed, port in use...)."""


class LeaseError(UdpflannelError):
    """The subnet lease could not be acquired or kept."""


class OutOfSubnets(LeaseError):
    """Every subnet between SubnetMin and SubnetMax is leased."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("out of subnets" + (f": {detail}" if detail else ""))


class EtcdUnavailable(UdpflannelError):
    """etcd did not answer; the dataplane keeps forwarding with the routes it has."""
