"""The TUN layer's one error: the device cannot be created or configured (``udpflannel`` maps it to
its set-up failure, exit status 1). Bad *packets* never raise: ``tun.segment`` returns a
:class:`~tun.segment.Refused` reason instead."""

from __future__ import annotations


class TunError(Exception):
    """The TUN device cannot be created or configured; the message says what to check."""

    exit_code = 1
