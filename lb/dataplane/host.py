"""The running data plane of one host: load with pins, configure, attach, upgrade, detach.

`open_host(settings)` is what the API lifespan (and any long-running control plane) enters:

    with open_host(settings) as host:
        control = ControlPlane(settings, host.balancer)
        ...

Leaving the block closes this process's fds only. The program stays attached and the maps
stay pinned, so the data plane keeps forwarding while the control plane is stopped or
restarted, as Katran and Cilium do; the next `open_host` reuses the pins and atomically
replaces the running program. Only `host.detach()` takes the balancer off the interface.

With the XDP chain (settings.xdp_chain, or a filter in it: lb.dataplane.chain) the interface
runs the chain's root and the balancer sits in the chain's last slot: a restart or an upgrade
replaces that slot instead of the attached program, and the filters stay.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lb.config import DataplaneConfig, RuntimeConfig
from lb.dataplane import attach as xdp
from lb.dataplane import chain, netlink, privileges
from lb.dataplane.loader import Balancer, write_runtime_config
from lb.errors import Conflict, NotFound
from lb.settings import Settings

__all__ = ["Host", "open_host", "write_runtime_config"]

MODES = ("native", "generic")


@dataclass
class Host:
    """The balancer loaded from its pins, and where it is attached."""

    settings: Settings
    balancer: Balancer
    runtime: RuntimeConfig
    attach_info: xdp.AttachInfo | None = None
    detached: bool = field(default=False)
    #: The chain's root program while it is attached in front of the balancer, else None.
    root: chain.Root | None = None

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
        if self.wants_chain():
            return self._attach_chained()
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

    # -- the XDP chain (lb.dataplane.chain, docs/chain.md) --

    def wants_chain(self) -> bool:
        """The chain is on when configured (xdp_chain) or while a filter is in it."""
        return self.settings.xdp_chain or bool(chain.filters(self.settings.pin_dir))

    def _attach_chained(self) -> xdp.AttachInfo:
        # The balancer goes into its slot first, then the root onto the interface: the root
        # never runs with an empty balancer slot. A root already attached (a restart) stays
        # and only the balancer slot changes: one atomic map update.
        s = self.settings
        assert s.interface is not None
        root = self.root or chain.Root(s.pin_dir)
        try:
            chain.set_slot(s.pin_dir, chain.CHAIN_BALANCER_SLOT, self.balancer.prog_fd,
                           "the balancer")  # fmt: skip
            xdp.pin_program(self.balancer.prog_fd, s.pin_dir)
            now = self.xdp_state()
            if now is not None and now.prog_id == root.prog_id and now.mode in MODES:
                mode: xdp.Mode = "native" if now.mode == "native" else "generic"
                info = xdp.AttachInfo(s.interface, s.netns, now.ifindex, mode, now.prog_id,
                                      f"the chain's root (id {now.prog_id}) kept")
            else:
                info = xdp.attach(root.prog_fd, s.interface, mode=s.xdp_mode, netns=s.netns,
                                  replace_foreign=s.replace_foreign, pin_dir=s.pin_dir,
                                  pin_name=xdp.ROOT_PIN)  # fmt: skip
            root.pin()
        except BaseException:
            if root is not self.root:
                root.close()
            raise
        self.root, self.attach_info, self.detached = root, info, False
        return info

    def _unchain(self) -> None:
        # Back to the balancer on the interface itself (atomic replace of the root): the
        # chain's last filter is gone and xdp_chain is off, so nothing pays the tail call.
        s = self.settings
        assert s.interface is not None and self.root is not None
        old = self.attach_info
        self.attach_info = xdp.attach(
            self.balancer.prog_fd, s.interface, mode=old.mode if old else s.xdp_mode,
            netns=s.netns, expected_prog_id=old.prog_id if old else None, pin_dir=s.pin_dir,
        )  # fmt: skip
        (s.pin_dir / xdp.ROOT_PIN).unlink(missing_ok=True)
        # The balancer's slot would keep this program loaded past its next upgrade.
        chain.clear_slot(s.pin_dir, chain.CHAIN_BALANCER_SLOT)
        self.root.close()
        self.root = None

    def chain_slots(self) -> list[chain.ChainSlot]:
        """The chain's slots ([] when it was never on)."""
        pin_dir = self.settings.pin_dir
        return chain.slots(pin_dir) if chain.chain_exists(pin_dir) else []

    def chain_add(self, slot: int, pin: Path) -> chain.ChainSlot:
        """Put the XDP program pinned at `pin` in filter slot `slot` (an atomic replace of what
        runs there); turns the chain on first when it is off."""
        s = self.settings
        chain.check_filter_slot(slot)
        fd = chain.open_filter(pin)  # the pin's problems before anything changes
        os.close(fd)
        if self.root is None:
            if not s.interface or self.attach_info is None:
                raise Conflict("the balancer is not attached to an interface: no chain to add"
                               " a filter to", field="interface")
            self._attach_chained()
        return chain.add_filter(s.pin_dir, slot, pin)

    def chain_remove(self, slot: int) -> chain.ChainSlot:
        """Empty filter slot `slot`; the last filter gone (and xdp_chain off), the balancer is
        attached on its own again."""
        if self.root is None:
            raise NotFound("the XDP chain is off: no filter to remove", field="slot")
        removed = chain.remove_filter(self.settings.pin_dir, slot)
        if not self.wants_chain():
            self._unchain()
        return removed

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
            if self.root is not None:
                # Under the chain the root stays; the balancer's slot changes atomically.
                chain.set_slot(self.settings.pin_dir, chain.CHAIN_BALANCER_SLOT, new.prog_fd,
                               "the new balancer")  # fmt: skip
                xdp.pin_program(new.prog_fd, self.settings.pin_dir)
                info = self.attach_info
            elif self.attach_info is not None:
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
        if self.root is not None:
            self.root.close()
            self.root = None
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
    host = Host(settings, balancer, runtime)
    try:
        write_runtime_config(balancer, runtime)
        chain.ensure_chain_map(settings.pin_dir)
        if attach:
            host.attach()
        yield host
    finally:
        if host.root is not None:
            host.root.close()
        balancer.close()
