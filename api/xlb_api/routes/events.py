"""Live events (Server-Sent Events) and packet capture (pcap) from the data plane's ring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from lb.dataplane.events import EV_CAP_SNAPLEN, EV_K_TX, Record
from lb.ops.monitor import (
    EventFilter,
    EventHub,
    Subscription,
    describe,
    parse_reasons,
    parse_types,
)
from lb.ops.pcap import pcap_header, pcap_record
from xlb_api.deps import ControlDep, ReadAuth, RuntimeDep, WriteAuth
from xlb_api.problems import NotReady, problem_responses

router = APIRouter(tags=["events"], responses=problem_responses(401, 404, 422, 503))

#: A comment line this often keeps proxies and clients from timing a quiet stream out.
KEEPALIVE_S = 10.0
#: How often a stream reports what was lost (its own queue, the kernel's ring), when it grew.
LOSS_EVERY_S = 1.0

VipQuery = Annotated[list[str] | None, Query(description="only these VIPs (ids)")]
SampleQuery = Annotated[int, Query(ge=1, le=1_000_000, description="report 1 in N packets")]


def _hub(rt: RuntimeDep) -> EventHub:
    if rt.events is None:
        raise NotReady("no data plane is loaded: there are no events")
    return rt.events


def _vip_nums(control: ControlDep, vips: list[str] | None) -> frozenset[int] | None:
    if not vips:
        return None
    return frozenset(control.vip_number(v) for v in vips)


async def _records(hub: EventHub, sub: Subscription, deadline: float | None,
                   ) -> AsyncIterator[list[Record]]:
    """Batches of the subscription's records (an empty batch: time for a keep-alive)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(ready.set)

    sub.notify = wake
    try:
        while deadline is None or time.monotonic() < deadline:
            batch = sub.take()
            if batch:
                yield batch
                continue
            ready.clear()
            wait = KEEPALIVE_S if deadline is None else min(KEEPALIVE_S,
                                                            deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), max(wait, 0.0))
            if not sub.take(0) and not ready.is_set():
                yield []
    finally:
        sub.notify = None
        await asyncio.to_thread(hub.unsubscribe, sub)


@router.get("/v1/events", dependencies=[ReadAuth], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_events(
    rt: RuntimeDep,
    control: ControlDep,
    type: Annotated[list[str] | None, Query(description="drop, pass, flow, fwd, icmp, guard")]
    = None,
    reason: Annotated[list[str] | None, Query(description="counter names, e.g. no_backend")]
    = None,
    vip: VipQuery = None,
    sample: SampleQuery = 1,
    count: Annotated[int | None, Query(ge=1, description="stop after N events")] = None,
    duration: Annotated[float | None, Query(gt=0, description="stop after S seconds")] = None,
) -> StreamingResponse:
    """Sampled data-plane events as Server-Sent Events (`event: <type>`, JSON data).

    Each client has a bounded queue: events that find it full are dropped and counted, and
    an `event: lost` message reports that count (`dropped`) with the records the kernel's
    ring had no room for (`ring_lost`). The kernel samples 1 in the smallest `sample` any
    client asks.
    """
    hub = _hub(rt)
    flt = EventFilter(types=parse_types(type or []), reasons=parse_reasons(reason or []),
                      vips=_vip_nums(control, vip), sample=sample)
    names = control.vip_names()
    gue = hub.gue_port()
    sub = await asyncio.to_thread(hub.subscribe, flt)
    deadline = None if duration is None else time.monotonic() + duration
    ring_lost0 = hub.ring_counters()[1]

    async def body() -> AsyncIterator[bytes]:
        sent, reported, last = 0, (0, 0), time.monotonic()
        async for batch in _records(hub, sub, deadline):
            out = []
            for rec in batch:
                if count is not None and sent >= count:
                    break
                ev = describe(rec, hub.wall_offset_ns, names, gue)
                out.append(f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n")
                sent += 1
            now = time.monotonic()
            if now - last >= LOSS_EVERY_S or not batch:
                last = now
                lost = (sub.dropped, hub.ring_counters()[1] - ring_lost0)
                if lost != reported:
                    reported = lost
                    out.append("event: lost\ndata: "
                               + json.dumps({"dropped": lost[0], "ring_lost": lost[1]}) + "\n\n")
            if not batch:
                out.append(": keep-alive\n\n")
            yield "".join(out).encode()
            if count is not None and sent >= count:
                return

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/v1/capture", dependencies=[WriteAuth], response_class=StreamingResponse,
            responses={200: {"content": {"application/vnd.tcpdump.pcap": {}}}})
async def capture(
    rt: RuntimeDep,
    control: ControlDep,
    vip: VipQuery = None,
    count: Annotated[int, Query(ge=1, le=1_000_000, description="frames to write")] = 100,
    duration: Annotated[float, Query(gt=0, le=3600, description="stop after S seconds")]
    = 10.0,
) -> StreamingResponse:
    """Frames as the balancer received them and as it sent them (after encapsulation), as a
    pcap file (Ethernet). Needs the token even from loopback: frames carry payload."""
    hub = _hub(rt)
    flt = EventFilter(vips=_vip_nums(control, vip), capture=True)
    sub = await asyncio.to_thread(hub.subscribe, flt)
    deadline = time.monotonic() + duration

    async def body() -> AsyncIterator[bytes]:
        yield pcap_header(EV_CAP_SNAPLEN)
        written = 0
        async for batch in _records(hub, sub, deadline):
            out = []
            for rec in batch:
                if written >= count:
                    break
                ts = rec.ts_ns + hub.wall_offset_ns + (1000 if rec.kind == EV_K_TX else 0)
                out.append(pcap_record(ts, rec.data, rec.frame_len))
                written += 1
            if out:
                yield b"".join(out)
            if written >= count:
                return

    return StreamingResponse(body(), media_type="application/vnd.tcpdump.pcap",
                             headers={"Content-Disposition": 'attachment; filename="xlb.pcap"'})
