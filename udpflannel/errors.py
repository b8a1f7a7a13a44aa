"""The error families and their exit codes. Messages tell the user what to do; the CLI maps every
family to ``exit_code`` (2 for bad configuration, 1 for the rest).

The leaves own their errors (``lease.errors``, ``tun.errors``); this module adds the node's own and
re-exports the control plane's, so the rest of ``udpflannel`` has one place to import them from.
Bad *packets* never raise: the sans-IO core returns a verdict instead (see ``udpflannel.packet``).
"""

from __future__ import annotations

from lease.errors import ConfigError, ControlPlaneError, EtcdUnavailable, LeaseError, OutOfSubnets
from tun.errors import TunError

__all__ = ["ConfigError", "ControlPlaneError", "EtcdUnavailable", "LeaseError", "OutOfSubnets", "SetupError",
           "TunError", "UdpflannelError", "FAMILIES"]


class UdpflannelError(Exception):
    """Base class of the node's own errors; ``exit_code`` as for every family."""

    exit_code = 1


class SetupError(UdpflannelError):
    """The node cannot be set up (no interface, TUN creation failed, port in use...)."""


FAMILIES = (UdpflannelError, ConfigError, ControlPlaneError, TunError)  # what the CLI turns into exit codes
