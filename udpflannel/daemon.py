"""The daemon: flanneld's start-up order (reference §9.2) with the UDP backend in Python.

config (retry every 1 s while missing or invalid) → interface → lease → TUN → UDP socket →
clean-up of the unused rule mode → masquerade rules → forward rules → blackhole route → subnet.env →
ready → run (dataplane + lease events + resync) until SIGTERM/SIGINT.

The dataplane never waits on etcd: routes are cached in the engine, and the lease manager's event
stream reconnects on its own, so a dead etcd stops route *changes*, not forwarding.
"""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Network

from lease.events import ControlEvent, LeaseAcquired, LeaseLost
from lease.protocol import SubnetManager
from lease.subnetenv import format_subnet_env, write_subnet_env
from udpflannel.blackhole import METRIC, blackhole_present, ensure_blackhole, remove_blackhole
from udpflannel.errors import ConfigError, ControlPlaneError, EtcdUnavailable, SetupError
from udpflannel.flags import etcd_subnet_manager
from udpflannel.iface import select_interface
from udpflannel.loopthread import LoopThread
from udpflannel.node import Node, bring_up, wait_for_stop_signal
from udpflannel.nodeapi import NodeApi
from udpflannel.resync import Kept, keep
from udpflannel.traffic import TrafficRules

log = logging.getLogger(__name__)

CONFIG_RETRY = 1.0
LEFTOVER_GRACE = 0.5  # seconds tasks cancelled at shutdown get to finish before they count as leaked


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: the daemon's task group ends, cleanly."""


async def _until_stopped() -> None:
    raise Stopped(await wait_for_stop_signal())


class Daemon:
    """``make_manager(args, public_ip)``: the subnet manager to run with (``lease.protocol``): etcd's,
    as flanneld's, unless the caller brings another."""

    def __init__(self, args: Namespace, *, make_manager: Callable[[Namespace, IPv4Address], SubnetManager] = etcd_subnet_manager) -> None:
        self.args = args
        self._make_manager = make_manager
        self.ready = False
        self.node: Node | None = None
        self.manager: SubnetManager | None = None
        self.control = LoopThread("udpflannel-etcd")  # the manager runs there, never behind the data path
        self.lease = None
        self.config = None
        self.traffic: TrafficRules | None = None
        self.kept: list[Kept] = []  # what the resync keeps in place (rules, blackhole route)
        self._resync_lock = asyncio.Lock()
        self.api = NodeApi(self)

    # -- what the HTTP views show (udpflannel.nodeapi.NodeState) ----------------------------------------
    def gauges(self) -> dict[str, float]:
        """The lease's expiry, what this daemon has asked etcd (by kind: the load one node puts on it) and
        the asyncio tasks alive (flat over time, or something leaks)."""
        out = {"asyncio_tasks": float(len(asyncio.all_tasks()) + self.control.tasks())}
        if self.manager is not None:
            requests = getattr(self.manager, "etcd_requests", {})  # what an etcd manager asked etcd, by kind
            out.update({f"etcd_{kind}_requests": float(n) for kind, n in sorted(requests.items())})
            expires = self.manager.expires_at_unix
            if expires:
                out["lease_expiry_timestamp_seconds"] = float(expires)
        return out

    def network_name(self) -> str | None:
        return str(self.config.network) if self.config else None

    def lease_info(self) -> dict | None:
        lease = self.lease
        if lease is None:
            return None
        return {"subnet": str(lease.subnet), "public_ip": str(lease.public_ip), "key": lease.key,
                "expires_at": self.manager.expires_at_unix if self.manager else None}

    # -- start-up ---------------------------------------------------------------------------------------
    async def _get_config(self):
        """flanneld retries forever, once a second; so do we, with the reason in the log."""
        assert self.manager is not None
        last_error = ""
        while True:
            try:
                return await self.control.run(self.manager.get_config())
            except (ConfigError, EtcdUnavailable) as exc:
                if str(exc) != last_error:
                    log.warning("Couldn't fetch network config: %s (retrying every %.0f s)", exc, CONFIG_RETRY)
                    last_error = str(exc)
            await asyncio.sleep(CONFIG_RETRY)

    def _write_subnet_env(self) -> None:
        assert self.node is not None and self.config is not None
        text = format_subnet_env(network=self.config.network, subnet=self.node.subnet, mtu=self.node.tun_mtu, ip_masq=self.args.ip_masq)
        write_subnet_env(self.args.subnet_file, text)

    async def run(self) -> int:
        """Start up, then run the workers, all in one task group until SIGTERM/SIGINT (which ends it
        cleanly, start-up included) or a failure (raised, for the CLI's exit code)."""
        a = self.args
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_until_stopped(), name="udpflannel-signals")
                if a.healthz_port:
                    await self.api.http.serve_tcp(a.healthz_ip, a.healthz_port)
                await self.api.http.serve_unix(a.control_socket)
                self.control.start()
                iface = await asyncio.to_thread(select_interface, a.iface, a.iface_regex, a.iface_can_reach or None, a.public_ip or None)
                log.info("Using interface %s with address %s (public %s)", iface.name, iface.iface_addr, iface.ext_addr)
                self.manager = self._make_manager(a, iface.ext_addr)
                await self._start(iface)
                tasks.create_task(self._follow_events(), name="udpflannel-events")
                tasks.create_task(self.api.track_last_seen(), name="udpflannel-last-seen")
                tasks.create_task(keep(lambda: self.kept, period=a.iptables_resync, lock=self._resync_lock),
                                  name="udpflannel-resync")
        except BaseExceptionGroup as group:
            errors = [exc for exc in group.exceptions if not isinstance(exc, Stopped)]
            if errors:
                raise errors[0] from group
        finally:
            await self._shutdown()
        log.info("Exiting cleanly...")
        return 0

    async def _start(self, iface) -> None:
        assert self.manager is not None
        self.config = await self._get_config()
        self.lease = await self.control.run(self.manager.acquire())
        log.info("Acquired lease %s (public ip %s)", self.lease.subnet, self.lease.public_ip)
        self.node = await asyncio.to_thread(
            bring_up, iface, self.lease.subnet, self.config.network, self.config.port,
            budget=self.args.budget, check_source=not self.args.accept_any_inner_source, trace=self.args.trace,
            fast_path=not self.args.no_fast_path, disabled_offloads=self.args.disable_offloads,
        )
        self.node.attach()
        await asyncio.to_thread(self._set_up_traffic)
        self._write_subnet_env()
        self.ready = True
        log.info("Wrote %s; ready", self.args.subnet_file)

    def _set_up_traffic(self) -> None:
        """Steps 9 and 10 of flanneld's start-up: clean up the unused mode, then masquerade and forward rules."""
        assert self.node is not None and self.config is not None
        a = self.args
        self.traffic = TrafficRules(nftables=self.config.enable_nftables, ip_masq=a.ip_masq,
                                    forward=a.iptables_forward_rules, fully_random_disable=a.ip_masq_fully_random_disable)
        self.traffic.clean_up_other_mode(self.config.network, self.node.subnet)
        self.kept = self._install_for(self.node.subnet)

    def _install_for(self, subnet: IPv4Network) -> list[Kept]:
        """The rules and (with --ip-blackhole-route) the blackhole route for our subnet, and what keeps them."""
        assert self.traffic is not None and self.config is not None
        kept = self.traffic.install(self.config.network, subnet)
        if self.args.ip_blackhole_route:
            try:
                ensure_blackhole(subnet)
                log.info("blackhole route %s metric %d in place", subnet, METRIC)
            except SetupError as exc:  # like flanneld: logged, and tried again every resync period
                log.error("Failed to setup blackhole route: %s", exc)
            kept.append(Kept(f"blackhole route {subnet}", partial(blackhole_present, subnet), partial(ensure_blackhole, subnet)))
        return kept

    async def _follow_events(self) -> None:
        """The manager's events, read on the control loop and applied here, on the data path's loop."""
        assert self.manager is not None and self.node is not None
        manager, events, main = self.manager, asyncio.Queue(), asyncio.get_running_loop()

        async def forward() -> None:  # on the control loop
            try:
                async for item in manager.events():
                    main.call_soon_threadsafe(events.put_nowait, item)
            except Exception as exc:  # handed over, raised below
                main.call_soon_threadsafe(events.put_nowait, exc)
            finally:
                main.call_soon_threadsafe(events.put_nowait, None)

        forwarding = asyncio.ensure_future(self.control.run(forward()))
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    raise event
                await self._apply(event)
        finally:
            forwarding.cancel()

    async def _apply(self, event: ControlEvent) -> None:
        assert self.node is not None
        match event:
            case LeaseAcquired():
                await self._own_lease(event)
            case LeaseLost(subnet, reason):
                log.warning("own lease %s lost (%s); re-acquiring, forwarding continues", subnet, reason)
            case _:  # a peer event
                log.info("%s", self.node.follow(event))

    async def _own_lease(self, event: LeaseAcquired) -> None:
        """Re-acquired after a loss: usually the same subnet; if not, move flannel0 and subnet.env."""
        assert self.node is not None
        self.lease = (self.manager.lease if self.manager else None) or self.lease
        if event.subnet == self.node.subnet:
            log.info("own lease %s held", event.subnet)
            return
        old, new = self.node.subnet, IPv4Network(event.subnet)
        async with self._resync_lock:  # the resync must not restore the old subnet's rules meanwhile
            await asyncio.to_thread(self.node.move_to, new)
            if self.args.ip_blackhole_route:
                try:
                    await asyncio.to_thread(remove_blackhole, old)
                except SetupError as exc:
                    log.error("could not remove the blackhole route of the old subnet: %s", exc)
            self.kept = await asyncio.to_thread(self._install_for, new)
        self._write_subnet_env()
        log.warning("own subnet moved %s -> %s; flannel0 and %s updated", old, event.subnet, self.args.subnet_file)

    async def _shutdown(self) -> None:
        """After the task group: the dataplane down, the lease released (if asked) and the manager
        closed, each bounded to 1 s (SIGTERM stops the daemon within 2 s); etcd may be gone."""
        self.ready = False
        if self.node is not None:
            log.info("stopping; counters %s", json.dumps(self.node.counters.as_dict()))
            self.node.close()
        if self.manager is not None:
            if self.args.release_lease_on_exit and self.lease is not None:
                try:
                    await asyncio.wait_for(self.control.run(self.manager.release()), 1.0)
                    log.info("released lease %s", self.lease.subnet)
                except (ControlPlaneError, TimeoutError) as exc:
                    log.warning("could not release lease %s: %s", self.lease.subnet, exc or "timed out")
            try:
                await asyncio.wait_for(self.control.run(self.manager.close()), 1.0)
            except (ControlPlaneError, TimeoutError) as exc:
                log.warning("closing the subnet manager: %s", exc or "timed out")
        if not self.control.stop():
            log.warning("the etcd thread did not stop")
        await self.api.http.close()
        await report_leftover_tasks(also=self.control.leftover)


async def report_leftover_tasks(grace: float = LEFTOVER_GRACE, also: list[str] = ()) -> None:
    """Name every task still running at exit: each is a leak, which the loop would otherwise cancel
    without a word. Tasks cancelled a moment ago get ``grace`` seconds to finish; ``also`` names those
    another loop (the etcd thread's) was left with."""
    me = asyncio.current_task()
    others = {t for t in asyncio.all_tasks() if t is not me}
    pending = (await asyncio.wait(others, timeout=grace))[1] if others else set()
    names = [*also, *sorted(f"{t.get_name()} ({getattr(t.get_coro(), '__qualname__', t.get_coro())})" for t in pending)]
    if names:
        log.warning("stopping with %d task(s) still running: %s", len(names), ", ".join(names))
    else:
        log.info("stopped: no task left running")
