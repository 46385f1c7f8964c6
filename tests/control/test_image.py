"""The incrementally kept desired image always equals the one recomputed from scratch."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lb.control.model import BackendSpec, Limits, VipSpec
from lb.control.reconcile import DesiredImage, RingCache, desired_image
from lb.control.store import Store

LIMITS = Limits(max_vips=8, max_backends=40, ring_size=4099)


def _random_change(rng: random.Random, store: Store) -> tuple[list[VipSpec], list[str]]:
    vips = list(store.vips.values())
    if not vips or (len(vips) < LIMITS.max_vips and rng.random() < 0.2):
        port = rng.choice([p for p in range(80, 80 + 2 * LIMITS.max_vips)
                           if f"tcp:198.18.0.10:{p}" not in store.vips])
        return [VipSpec.model_validate({"protocol": "tcp", "address": "198.18.0.10",
                                        "port": port, "encap": rng.choice(["ipip", "gue"])})], []
    v = rng.choice(vips)
    if rng.random() < 0.1:
        return [], [v.id]
    backends = list(v.backends)
    roll = rng.random()
    if roll < 0.5 or not backends:
        addr = f"198.18.1.{rng.randrange(1, 30)}"
        if all(b.identity != addr for b in backends):
            backends.append(BackendSpec.model_validate({"address": addr}))
    elif roll < 0.7:
        backends.remove(rng.choice(backends))
    else:
        i = rng.randrange(len(backends))
        backends[i] = backends[i].model_copy(update={
            "state": rng.choice(["active", "draining", "disabled"]),
            "weight": rng.randrange(0, 4),
        })
    return [v.model_copy(update={"backends": backends})], []


def test_incremental_image_matches_full_recompute(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = Store(tmp_path, LIMITS)
    rings = RingCache(LIMITS.ring_size)
    image = DesiredImage(rings)
    for step in range(300):
        upserts, deletes = _random_change(rng, store)
        store.commit(upserts, deletes)
        image.sync(store.vips, store.vip_nums, store.real_idx)
        full = desired_image(store.vips.values(), store.vip_nums, store.real_idx, rings)
        assert image.image == full, f"step {step}: incremental image drifted"
    store.close()


def test_rings_built_ahead_two_at_a_time_are_the_rings_built_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vips = [VipSpec.model_validate({
        "protocol": "tcp", "address": "198.18.0.10", "port": 80 + n,
        "backends": [{"address": f"198.18.{n}.{k}", "weight": k} for k in range(1, 6)],
    }) for n in range(6)]
    real_idx = {b.identity: i + 1 for i, b in enumerate(b for v in vips for b in v.backends)}
    ahead = RingCache(LIMITS.ring_size)
    builders: set[str] = set()
    helper_took_one, caller_took_one = threading.Event(), threading.Event()
    build = ahead._build

    def counted(key: tuple[tuple[str, int], ...]) -> Any:
        # Each thread holds its first ring until the other has one too, however the two are
        # scheduled (a helper that starts first would otherwise take them all).
        name = threading.current_thread().name
        if name.startswith("helper"):
            helper_took_one.set()
            caller_took_one.wait(10)
        else:
            caller_took_one.set()
            helper_took_one.wait(10)
        builders.add(name)
        return build(key)

    monkeypatch.setattr(ahead, "_build", counted)
    with ThreadPoolExecutor(1, thread_name_prefix="helper") as helper:
        ahead.prebuild_all(vips, helper)
    assert len(builders) == 2, "the helper thread built no ring"
    monkeypatch.setattr(ahead, "_build", lambda key: pytest.fail("built again"))
    alone = RingCache(LIMITS.ring_size)
    for v in vips:
        assert ahead.values(v, real_idx) == alone.values(v, real_idx), v.id
