"""The running data plane of one host: load with pins, configure, attach, upgrade, detach.

`open_host(settings)` is what the API lifespan (and any long-running control plane) enters:

    with open_host(settings) as host:
        control = ControlPlane(settings, host.balancer)
        ...

Leaving the block closes this process's fds only. The program stays attached and the maps
stay pinned, so the data plane keeps forwarding while the control plane is stopped or
restarted, as Katran and Cilium do; the next `open_host` reuses the pins and atomically
replaces the running program. Only `host.detach()` takes the balancer off the interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lb.config import DataplaneConfig, RuntimeConfig
from lb.dataplane import attach as xdp
from lb.dataplane import netlink, privileges
from lb.dataplane.loader import Balancer, write_runtime_config
from lb.settings import Settings

__all__ = ["Host", "open_host", "write_runtime_config"]


@dataclass
class Host:
    """The balancer loaded from its pins, and where it is attached."""

    settings: Settings
    balancer: Balancer
    runtime: RuntimeConfig
    attach_info: xdp.AttachInfo | None = None
    detached: bool = field(default=False)

    def xdp_state(self) -> xdp.XdpState | None:
        """What the interface runs now, asked from the kernel (None without an interface)."""
        s = self.settings
        return xdp.query(s.interface, netns=s.netns, pin_dir=s.pin_dir) if s.interface else None

    def lb_mac(self) -> str | None:
        """The MAC of the interface the program runs on (None without an interface)."""
        s = self.settings
        return netlink.link_info(s.netns, s.interface).mac if s.interface else None

    def attach(self) -> xdp.AttachInfo | None:
        """Attach per settings (after `open_host(..., attach=False)` and a first reconcile).

        A program already there that is ours is replaced atomically in its mode; a foreign
        one only with settings.replace_foreign. None when no interface is configured.
        """
        s = self.settings
        if not s.interface:
            return None
        # The interface's own MAC (frames to other hosts are not balanced), now that it is
        # known to be the one the program runs on.
        write_runtime_config(self.balancer, self.runtime, lb_mac=self.lb_mac())
        self.attach_info = xdp.attach(
            self.balancer.prog_fd,
            s.interface,
            mode=s.xdp_mode,
            netns=s.netns,
            replace_foreign=s.replace_foreign,
            pin_dir=s.pin_dir,
        )
        self.detached = False
        return self.attach_info

    def upgrade(self, new_dataplane_config: DataplaneConfig | None = None) -> xdp.AttachInfo | None:
        """Load a new program (new code or features, same map sizes) and swap it in atomically.

        The new program reuses the pinned maps, so tracked flows keep their backends; map
        sizes that differ raise IncompatiblePins before anything changes. `host.balancer`
        stays the same object and now holds the new program. Returns the new attachment
        (None when not attached). Call it with control-plane writes paused (under its lock).
        """
        cfg = new_dataplane_config or self.balancer.config
        new = Balancer(cfg, pin_dir=self.settings.pin_dir)
        try:
            # lb_cfg may be new (a changed layout is replaced, see Balancer): write it.
            write_runtime_config(
                new, self.runtime, lb_mac=self.lb_mac() if self.attach_info else None
            )
            info = None
            if self.attach_info is not None:
                old = self.attach_info
                info = xdp.attach(
                    new.prog_fd,
                    old.interface,
                    mode=old.mode,
                    netns=old.netns,
                    expected_prog_id=old.prog_id,
                    pin_dir=self.settings.pin_dir,
                )
        except BaseException:
            new.close()
            raise
        self.balancer.take_over(new)
        self.attach_info = info
        return info

    def detach(self) -> xdp.XdpState | None:
        """Take the balancer off the interface (traffic passes to the stack); maps stay pinned."""
        s = self.settings
        removed = (
            xdp.detach(s.interface, netns=s.netns, pin_dir=s.pin_dir) if s.interface else None
        )
        self.attach_info = None
        self.detached = True
        return removed


def effective_runtime(settings: Settings) -> RuntimeConfig:
    """settings.runtime with what is unset taken from the interface: the gateway MAC from the
    default route's neighbour, the LB's own outer sources (src_v4/src_v6, used by
    `outer_source: lb`) from the interface's first global address of each family."""
    runtime = settings.runtime
    if settings.interface is None:
        return runtime
    update: dict[str, object] = {}
    if settings.gateway_mac_unset:
        update["gateway_mac"] = xdp.resolve_gateway_mac(settings.interface, netns=settings.netns)
    if runtime.src_v4.is_unspecified or runtime.src_v6.is_unspecified:
        for text in netlink.addresses(settings.netns, settings.interface):
            addr = ipaddress.ip_interface(text).ip
            if addr.is_link_local or addr.is_loopback or addr.is_multicast:
                continue
            key = f"src_v{addr.version}"
            if getattr(runtime, key).is_unspecified and key not in update:
                update[key] = addr
    return runtime.model_copy(update=update) if update else runtime


@contextmanager
def open_host(settings: Settings, *, attach: bool = True, repin: bool = False) -> Iterator[Host]:
    """Load the balancer with its pins, write lb_cfg, attach per settings; see module doc.

    `repin=True` drops the old pins first (after an IncompatiblePins, on the operator's word).
    On exit the program stays attached and the maps pinned unless `host.detach()` was called.
    """
    privileges.require()
    runtime = effective_runtime(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    balancer = Balancer(settings.dataplane, pin_dir=settings.pin_dir, repin=repin)
    try:
        write_runtime_config(balancer, runtime)
        host = Host(settings, balancer, runtime)
        if attach:
            host.attach()
        yield host
    finally:
        balancer.close()
