"""A blocking etcd v3 client for the control plane, over aetcd (asyncio, gRPC).

The control plane is threaded (its lock, its group commit), aetcd is asyncio: `Etcd` runs
one event loop in a thread of its own and every call is a coroutine submitted to it, waited
for with a timeout. What this adds to aetcd:

- several endpoints: aetcd's `Client` talks to one member; a call that cannot reach it
  moves to the next endpoint and tries again (once round the list), so a 3-member cluster
  that lost one member goes on serving;
- TLS: aetcd opens only plaintext channels; `_Client` opens a secure one when a CA, or a
  client certificate, is configured;
- one error: anything that means "etcd did not answer" becomes `EtcdUnavailable`, which the
  store turns into a 503 problem naming the store;
- `follow`: a watch of a prefix from a revision that survives a lost connection (it resumes
  from the last revision it delivered) and a compacted revision (it reports `Compacted`, and
  the caller reads everything again).

Why aetcd: it is maintained and asyncio; `etcd3` 0.12 (2020) breaks on protobuf >= 4 and
`etcd3gw` speaks the JSON gateway, synchronously, without a usable watch stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd  # type: ignore[import-untyped]
import aetcd.exceptions  # type: ignore[import-untyped]
import aetcd.watcher  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]
from aetcd import rpc

from lb.config import EtcdConfig
from lb.errors import KernelError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: gRPC keepalive, so a member that stops answering (partition, SIGSTOP) is noticed within
#: seconds instead of at the next call. etcd refuses pings more often than every 5 s.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}


class EtcdUnavailable(KernelError):
    """etcd could not be reached (or did not answer in time)."""

    kind = "store-unavailable"


class Compacted(Exception):
    """The revision a watch was to resume from is compacted: read everything again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted below {revision}")
        self.revision = revision


@dataclass(frozen=True)
class KV:
    """One key as read: its value and the revision that last changed it."""

    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Change:
    """One event of a watch: a put (value) or a delete (value None), at its revision."""

    key: bytes
    value: bytes | None
    revision: int


@dataclass(frozen=True)
class Op:
    """One operation of a transaction: put `value` at `key`, or delete `key` (value None)."""

    key: bytes
    value: bytes | None


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client, with a TLS channel when credentials are configured."""

    def __init__(self, host: str, port: int, tls: grpc.ChannelCredentials | None,
                 **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self._tls = tls

    async def connect(self) -> None:
        """Connect as aetcd does, through a secure channel when TLS is configured."""
        if self._tls is None or self._connected.is_set():
            await super().connect()
            return
        if getattr(self, "_is_connecting", False):  # another task is connecting: wait
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        # aetcd 1.0's connect() with grpc.aio.secure_channel instead of insecure_channel.
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            self.channel = grpc.aio.secure_channel(target, self._tls,
                                                   options=list(self._options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel),
                                                  timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def _credentials(cfg: EtcdConfig) -> grpc.ChannelCredentials | None:
    if cfg.ca_file is None and cfg.cert_file is None:
        return None
    ca = cfg.ca_file.read_bytes() if cfg.ca_file else None
    cert = cfg.cert_file.read_bytes() if cfg.cert_file else None
    key = cfg.key_file.read_bytes() if cfg.key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


_UNREACHABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    grpc.aio.AioRpcError,
    asyncio.TimeoutError,
    TimeoutError,
    OSError,
)


class Etcd:
    """Blocking calls to an etcd cluster, made from any thread."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.endpoints: list[tuple[str, int]] = [_split(e) for e in cfg.endpoints]
        self._tls = _credentials(cfg)
        self._current = 0
        self._client: _Client | None = None
        self._closed = False
        self._loop = _shared_loop()
        self._watches: list[Future[None]] = []
        #: Last time a call or the watch heard from etcd (None: never), and the last error.
        self.reachable = False
        self.last_error: str | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        host, port = self.endpoints[self._current]
        return f"{host}:{port}"

    def describe(self) -> str:
        """The store as an operator names it: etcd at its endpoints, with the key prefix."""
        return f"etcd at {', '.join(self.cfg.endpoints)} (prefix {self.cfg.prefix})"

    # -- plumbing ---------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        fut: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout or self.cfg.timeout_s * (len(self.endpoints) + 1))
        except TimeoutError as e:
            fut.cancel()
            self._unreachable(e)
            raise EtcdUnavailable(f"{self.describe()} did not answer in time") from e

    def _unreachable(self, e: BaseException) -> None:
        self.reachable = False
        self.last_error = str(e) or type(e).__name__

    async def _connected(self) -> _Client:
        if self._closed:
            raise EtcdUnavailable(f"{self.describe()}: this client is closed")
        if self._client is None:
            host, port = self.endpoints[self._current]
            user = self.cfg.username
            pw = self.cfg.password.get_secret_value() if self.cfg.password else None
            self._client = _Client(host, port, self._tls, username=user, password=pw,
                                   timeout=self.cfg.timeout_s, options=dict(_CHANNEL_OPTIONS))
        return self._client

    async def _drop(self, failed: _Client | None) -> None:
        # Only the caller that saw this client fail moves on: the others' calls on it
        # fail too, and must not skip the next endpoint as well.
        if failed is None or failed is not self._client:
            return
        client, self._client = self._client, None
        self._current = (self._current + 1) % len(self.endpoints)
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 2)
            except Exception as e:  # closing a broken channel may fail too
                log.debug("closing the etcd channel: %r", e)

    async def _call(self, fn: Callable[[_Client], Coroutine[Any, Any, _T]]) -> _T:
        # Each endpoint once: a member that is down costs one timeout, then the next is asked.
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            client = await self._connected()
            try:
                out = await asyncio.wait_for(fn(client), self.cfg.timeout_s)
            except aetcd.exceptions.UnauthenticatedError as e:
                raise EtcdUnavailable(f"{self.describe()} refused our credentials: {e}") from e
            except asyncio.CancelledError as e:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this call is cancelled
                last = e  # the channel was closed under the call (another call's _drop)
                continue
            except _UNREACHABLE as e:
                last = e
                log.info("etcd %s unreachable: %r", self.endpoint, e)
                await self._drop(client)
                continue
            self.reachable = True
            self.last_error = None
            return out
        assert last is not None
        self._unreachable(last)
        raise EtcdUnavailable(f"{self.describe()} is unreachable: {self.last_error}") from last

    # -- calls ------------------------------------------------------------------------

    def get_prefix(self, prefix: bytes) -> tuple[int, list[KV]]:
        """Every key under `prefix` and the revision the read saw (one consistent read)."""

        async def go(c: _Client) -> tuple[int, list[KV]]:
            r = await c.get_prefix(prefix)
            return r.header.revision, [KV(kv.key, kv.value, kv.mod_revision) for kv in r]

        return self._run(self._call(go))

    def mod_revision(self, key: bytes) -> int:
        """The revision that last changed `key` (0: no such key)."""
        async def go(c: _Client) -> int:
            r = await c.get(key)
            return 0 if r is None else int(r.mod_revision)

        return self._run(self._call(go))

    def get(self, key: bytes) -> bytes | None:
        """The value of `key` (None: no such key)."""
        async def go(c: _Client) -> bytes | None:
            r = await c.get(key)
            return None if r is None else bytes(r.value)

        return self._run(self._call(go))

    def commit(self, guard: bytes, revision: int, ops: Sequence[Op],
               turn: bytes | None = None, holder: bytes | None = None) -> int | None:
        """Apply `ops` in one transaction if `guard` was last changed at `revision`.

        Returns the new revision, or None when the guard moved (another writer was first).
        `revision` 0 means the guard must not exist. With `turn`, the transaction also wants
        that key absent, or holding `holder` when one is given (docs/fleet-state.md).
        """
        async def go(c: _Client) -> int | None:
            t = c.transactions
            compare = [t.mod(guard) == revision]
            if turn is not None:
                compare.append(t.version(turn) == 0 if holder is None
                               else t.value(turn) == holder)
            success = [t.put(o.key, o.value) if o.value is not None else t.delete(o.key)
                       for o in ops]
            ok, responses = await c.transaction(compare=compare, success=success, failure=[])
            if not ok:
                return None
            for r in responses:
                kind = r.WhichOneof("response")
                if kind is not None:
                    return int(getattr(r, kind).header.revision)
            return None  # pragma: no cover - a transaction always has a put (the guard)

        return self._run(self._call(go))

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> int:
        """Put one key (with a lease id or none); returns the revision."""
        async def go(c: _Client) -> int:
            r = await c.put(key, value, lease=lease)
            return int(r.header.revision)

        return self._run(self._call(go))

    def delete(self, key: bytes) -> None:
        """Delete one key."""
        async def go(c: _Client) -> None:
            await c.delete(key)

        self._run(self._call(go))

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        async def go(c: _Client) -> int:
            return int((await c.lease(ttl)).id)

        return self._run(self._call(go))

    def claim(self, key: bytes, value: bytes, lease: int) -> bool:
        """Put `key` under `lease` if it does not exist; False when it does."""
        async def go(c: _Client) -> bool:
            t = c.transactions
            ok, _ = await c.transaction(compare=[t.version(key) == 0],
                                        success=[t.put(key, value, lease=lease)], failure=[])
            return bool(ok)

        return self._run(self._call(go))

    def revoke(self, lease: int) -> None:
        """End a lease now (its keys go with it); one that ran out already is no error."""
        async def go(c: _Client) -> None:
            try:
                await c.revoke_lease(lease)
            except _UNREACHABLE:
                raise
            except aetcd.exceptions.ClientError as e:
                if "lease not found" not in str(e):
                    raise

        self._run(self._call(go))

    def refresh(self, lease: int) -> bool:
        """Keep a lease alive; False when it has expired meanwhile."""
        async def go(c: _Client) -> bool:
            r = await c.refresh_lease(lease)
            return int(r.TTL) > 0

        return self._run(self._call(go))

    def compact(self, revision: int) -> None:
        """Drop the history below `revision` (tests and maintenance)."""
        async def go(c: _Client) -> None:
            await c.compact(revision, physical=True)

        self._run(self._call(go))

    # -- watch ------------------------------------------------------------------------

    def follow(
        self,
        prefix: bytes,
        start: Callable[[], int],
        deliver: Callable[[list[Change]], None],
        compacted: Callable[[int], int],
    ) -> None:
        """Watch `prefix` from `start()` + 1 until closed, through lost connections.

        `deliver` gets each watch response's changes (one transaction's keys arrive
        together); `compacted(revision)` is called when the revision to resume from is gone
        and returns the revision it read everything at (the watch resumes after it). Both
        run in the client's thread: they must not block on anything that waits for etcd.
        """
        self._watches.append(asyncio.run_coroutine_threadsafe(
            self._follow(prefix, start, deliver, compacted), self._loop))

    async def _follow(
        self,
        prefix: bytes,
        start: Callable[[], int],
        deliver: Callable[[list[Change]], None],
        compacted: Callable[[int], int],
    ) -> None:
        pos = [start()]  # the last revision delivered
        loop = asyncio.get_running_loop()
        while not self._closed:
            client = None
            try:
                client = await self._connected()
                await self._watch_once(client, prefix, pos, deliver)
            except aetcd.exceptions.RevisionCompactedError as e:
                log.warning("etcd compacted revision %d: reading everything again", pos[0])
                try:
                    pos[0] = await loop.run_in_executor(None, compacted,
                                                        int(e.compacted_revision))
                except Exception as e2:
                    log.warning("full read after compaction failed: %r", e2)
                    await asyncio.sleep(0.5)
            except (asyncio.CancelledError, Exception) as e:
                task = asyncio.current_task()
                if self._closed or (task is not None and task.cancelling()):
                    return
                self._unreachable(e)
                log.info("etcd watch on %s lost: %r; resuming from %d", self.endpoint, e,
                         pos[0])
                await self._drop(client)
                await asyncio.sleep(0.3)

    async def _watch_once(self, client: _Client, prefix: bytes, pos: list[int],
                          deliver: Callable[[list[Change]], None]) -> None:
        """One watch stream from pos[0] + 1 until it fails (raises) or the client closes."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BaseException] = asyncio.Queue()
        batch: list[Change] = []

        def flush() -> None:
            if batch:
                out = list(batch)
                batch.clear()
                pos[0] = max(pos[0], out[-1].revision)
                deliver(out)

        async def on_event(ev: Any) -> None:
            # aetcd calls this once per event of a response, without yielding between them:
            # flush after the response, so one transaction is delivered whole.
            if ev is None or isinstance(ev, BaseException):  # None: the stream ended
                queue.put_nowait(ev or ConnectionError("the watch stream ended"))
                return
            value = None if ev.kind == "DELETE" else ev.kv.value
            if not batch:
                loop.call_soon(flush)
            batch.append(Change(ev.kv.key, value, ev.kv.mod_revision))

        await client.connect()
        watcher = client._watcher
        cb = await asyncio.wait_for(watcher.add_callback(
            prefix, on_event, range_end=prefix_end(prefix), start_revision=pos[0] + 1),
            self.cfg.timeout_s)
        self.reachable = True
        try:
            while not self._closed:
                raise await queue.get()
        finally:
            flush()
            with _suppress():
                await asyncio.wait_for(watcher.cancel(cb.watch_id), 1)

    def close(self) -> None:
        """Stop the watches and close the channel (the shared loop goes on)."""
        if self._closed:
            return
        self._closed = True

        for w in self._watches:
            w.cancel()

        async def shut() -> None:
            if self._client is not None:
                with _suppress():
                    await asyncio.wait_for(self._client.close(), 2)
            self._client = None

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        except Exception as e:
            log.debug("closing etcd: %r", e)


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The event loop every Etcd client runs on: one per process, in a daemon thread.

    One loop for the life of the process, never closed: gRPC's asyncio poller keeps a
    reference to each loop it served and fails on one that was closed.
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="xlb-etcd", daemon=True).start()
            _LOOP = loop
        return _LOOP


class LeasedKey:
    """One key kept under a lease by a thread: its value is re-put when it changes, the lease
    refreshed every third of its life, granted again when it expired (etcd was away)."""

    def __init__(self, etcd: Etcd, key: bytes, ttl: int, name: str) -> None:
        self.etcd = etcd
        self.key = key
        self.ttl = ttl
        self._value: bytes | None = None
        self._dirty = threading.Event()
        self._closed = threading.Event()
        self._lease: int | None = None
        #: monotonic time of the last call etcd answered (None: never).
        self.last_ok: float | None = None
        self.puts = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start keeping the key."""
        self._thread.start()

    def set(self, value: bytes) -> None:
        """The key's value from now on (put by the thread; never blocks)."""
        if value != self._value:
            self._value = value
            self._dirty.set()

    def _run(self) -> None:
        period = self.ttl / 3
        while not self._closed.is_set():
            changed = self._dirty.wait(period)
            if self._closed.is_set():
                return
            try:
                if self._lease is not None and not changed and not self.etcd.refresh(
                        self._lease):
                    self._lease = None  # expired meanwhile: put again
                if self._value is not None and (self._lease is None or changed):
                    self._dirty.clear()
                    if self._lease is None:
                        self._lease = self.etcd.grant(self.ttl)
                    self.etcd.put(self.key, self._value, lease=self._lease)
                    self.puts += 1
                self.last_ok = time.monotonic()
            except KernelError as e:
                log.info("cannot keep %r in etcd: %s", self.key, e.detail)
                self._lease = None
                self._dirty.set()
                self._closed.wait(min(1.0, period))

    def close(self) -> None:
        """Stop, and delete the key if etcd answers (else its lease expires it)."""
        self._closed.set()
        self._dirty.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with contextlib.suppress(KernelError):
            self.etcd.delete(self.key)


class _suppress:
    """Swallow any exception (closing something that is already broken)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)
