"""The control plane's errors. Messages tell the user what to do; ``exit_code`` is what the command
line exits with when one ends the process (``udpflannel.errors`` maps every family to it).

A :class:`ConfigError` names the field at fault (a network config key or a flag). It is defined here,
in the lowest layer that validates configuration (the network config, the etcd flags), and
``udpflannel`` raises the same class for its own flags: one error for one kind of mistake.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value is wrong. ``field`` names it (a JSON key or a command-line flag)."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ControlPlaneError(Exception):
    """etcd or the lease failed; the dataplane keeps forwarding with the routes it has."""

    exit_code = 1


class EtcdUnavailable(ControlPlaneError):
    """etcd did not answer."""


class LeaseError(ControlPlaneError):
    """The subnet lease could not be acquired or kept."""


class OutOfSubnets(LeaseError):
    """Every subnet between SubnetMin and SubnetMax is leased."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("out of subnets" + (f": {detail}" if detail else ""))
