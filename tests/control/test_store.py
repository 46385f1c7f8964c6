"""The SQLite store: round trip, generation, stable and lazily reused indices."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lb.control.model import Limits, VipSpec
from lb.control.store import DB_NAME, Store, StoreError
from lb.errors import LimitReached

LIMITS = Limits(max_vips=4, max_backends=6, ring_size=4099)


def vip(port: int, *backends: str) -> VipSpec:
    return VipSpec.model_validate(
        {"protocol": "tcp", "address": "198.18.0.10", "port": port,
         "backends": [{"address": a} for a in backends]}
    )


def test_round_trip_keeps_specs_order_indices_and_generation(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1", "198.18.1.2"), vip(443, "198.18.1.2")])
    s.commit([vip(22)])
    s.commit([vip(443, "198.18.1.2", "2001:db8::3")])
    assert s.generation == 3
    before = (dict(s.vips), dict(s.vip_nums), dict(s.real_idx))
    s.close()
    again = Store(tmp_path, LIMITS)
    assert (dict(again.vips), dict(again.vip_nums), dict(again.real_idx)) == before
    assert list(again.vips) == ["tcp:198.18.0.10:80", "tcp:198.18.0.10:443",
                                "tcp:198.18.0.10:22"]
    assert again.generation == 3


def test_database_is_wal_with_full_sync(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()


def test_every_change_bumps_the_generation(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    gens = [s.commit([vip(80 + i)]).generation for i in range(3)]
    gens.append(s.commit(deletes=["tcp:198.18.0.10:80"]).generation)
    assert gens == [1, 2, 3, 4]


def test_shared_backend_has_one_index(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1", "198.18.1.2"), vip(443, "198.18.1.2", "198.18.1.1")])
    assert sorted(s.real_idx.values()) == [1, 2]  # index 0 is never handed out
    s.commit(deletes=["tcp:198.18.0.10:80"])
    assert set(s.real_idx) == {"198.18.1.1", "198.18.1.2"}  # still used by :443


def test_freed_indices_are_reused_last_and_oldest_first(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1", "198.18.1.2")])
    s.commit([vip(80, "198.18.1.2")])  # frees index 1
    c = s.commit([vip(80, "198.18.1.2", "198.18.1.3")])
    assert s.real_idx["198.18.1.3"] == 3 and c.new_real_idx == {3}  # never-used first
    s.commit([vip(80, "198.18.1.3")])  # frees index 2 (later than 1)
    s.commit([vip(80, "198.18.1.3", *[f"198.18.2.{i}" for i in range(1, 4)])])  # 4, 5, 6
    s.close()
    s = Store(tmp_path, LIMITS)  # the free list is durable too
    s.commit([vip(443, "198.18.3.1")])
    assert s.real_idx["198.18.3.1"] == 1  # the oldest freed
    s.commit([vip(444, "198.18.3.2")])
    assert s.real_idx["198.18.3.2"] == 2
    with pytest.raises(LimitReached, match="max_reals"):
        s.commit([vip(445, "198.18.3.3")])


def test_vip_numbers_are_stable_and_freed_lazily(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80), vip(81)])
    assert dict(s.vip_nums) == {"tcp:198.18.0.10:80": 0, "tcp:198.18.0.10:81": 1}
    s.commit(deletes=["tcp:198.18.0.10:80"])
    s.commit([vip(82)])
    assert s.vip_nums["tcp:198.18.0.10:82"] == 2
    s.commit([vip(83)])
    s.commit([vip(84)])  # only the freed 0 is left
    assert s.vip_nums["tcp:198.18.0.10:84"] == 0
    with pytest.raises(LimitReached, match="max_vips"):
        s.commit([vip(85)])


def test_failed_commit_changes_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1")])
    s._db.execute("CREATE TRIGGER boom BEFORE INSERT ON vips BEGIN "
                  "SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(StoreError, match="disk says no"):
        s.commit([vip(81, "198.18.1.2")])
    assert s.generation == 1 and list(s.vips) == ["tcp:198.18.0.10:80"]
    assert "198.18.1.2" not in s.real_idx
    s._db.execute("DROP TRIGGER boom")
    s.close()
    again = Store(tmp_path, LIMITS)
    assert again.generation == 1 and list(again.vips) == ["tcp:198.18.0.10:80"]


def test_shrunk_configuration_is_refused_naming_the_limit(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80 + i) for i in range(4)])
    s.close()
    with pytest.raises(LimitReached, match="max_vips"):
        Store(tmp_path, Limits(max_vips=2, max_backends=6, ring_size=4099))


def test_unreadable_store_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(tmp_path, LIMITS)


def _random_changes(tmp: Path, count: int) -> list[tuple[list[VipSpec], list[str], bool]]:
    """Changes made against a store committing one at a time: (upserts, deletes, refused)."""
    rng = random.Random(11)
    s = Store(tmp, LIMITS)
    out: list[tuple[list[VipSpec], list[str], bool]] = []
    for _ in range(count):
        ports = list(s.vips)
        roll = rng.random()
        deletes = [rng.choice(ports)] if ports and roll < 0.2 else []
        upserts = []
        if not deletes or roll < 0.1:  # sometimes a swap: one VIP out, another in
            port = rng.randrange(80, 88)
            addrs = rng.sample([f"198.18.1.{i}" for i in range(1, 12)], rng.randrange(0, 4))
            upserts = [vip(port, *addrs)]
            if f"tcp:198.18.0.10:{port}" in deletes:
                upserts = []
        try:
            s.commit(upserts, deletes)
            out.append((upserts, deletes, False))
        except LimitReached:
            out.append((upserts, deletes, True))
    s.close()
    return out


def _everything(s: Store) -> tuple[object, ...]:
    return (s.generation, list(s.vips.items()), dict(s.vip_nums), dict(s.real_idx),
            dict(s._vip_alloc.free), dict(s._real_alloc.free), s._vip_alloc.next_unused,
            s._real_alloc.next_unused, dict(s._refs))


def test_a_batch_stores_what_its_changes_store_one_by_one(tmp_path: Path) -> None:
    changes = _random_changes(tmp_path / "one-by-one", 400)
    assert 10 < sum(refused for *_, refused in changes) < 200  # the limits are reached
    rng = random.Random(5)
    s = Store(tmp_path / "batched", LIMITS)
    gens: list[int] = []
    for k, (upserts, deletes, refused) in enumerate(changes):
        if refused:
            before = _everything(s)
            with pytest.raises(LimitReached):
                s.stage(upserts, deletes)
            assert _everything(s) == before, f"change {k}: a refused change left a trace"
        else:
            gens.append(s.stage(upserts, deletes).generation)
            assert s.generation < s.staged_generation == gens[-1]
        if rng.random() < 0.3:
            s.write()
            assert s.generation == s.staged_generation
    s.write()
    assert gens == list(range(1, len(gens) + 1)), "generations are not contiguous"
    reference = Store(tmp_path / "one-by-one", LIMITS)
    assert _everything(s) == _everything(reference)
    s.close()
    assert _everything(Store(tmp_path / "batched", LIMITS)) == _everything(reference)


def test_abort_puts_back_a_deleted_vip_in_its_place(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1"), vip(81, "198.18.1.2"), vip(82, "198.18.1.1")])
    before = _everything(s)
    s.stage([vip(83, "198.18.1.3")])
    s.stage(deletes=["tcp:198.18.0.10:80", "tcp:198.18.0.10:81"])
    s.stage([vip(80, "198.18.1.4")])
    assert list(s.vips) == ["tcp:198.18.0.10:82", "tcp:198.18.0.10:83", "tcp:198.18.0.10:80"]
    s.abort()
    assert _everything(s) == before
    s.write()  # nothing staged: nothing written
    assert s.generation == 1


def test_failed_batch_write_changes_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    s.commit([vip(80, "198.18.1.1"), vip(81, "198.18.1.2")])
    before = _everything(s)
    s.stage(deletes=["tcp:198.18.0.10:80"])
    s.stage([vip(82, "198.18.1.3")])
    s._db.execute("CREATE TRIGGER boom BEFORE INSERT ON vips BEGIN "
                  "SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(StoreError, match="disk says no"):
        s.write()
    assert _everything(s) == before
    s._db.execute("DROP TRIGGER boom")
    s.close()
    assert _everything(Store(tmp_path, LIMITS)) == before


def _legacy_zone_store(tmp_path: Path) -> None:
    """A store as versions before issue 14 could leave it: zone-id twins of real objects."""
    import json
    import sqlite3

    s = Store(tmp_path, LIMITS)
    real = VipSpec.model_validate(
        {"protocol": "tcp", "address": "2001:db8::10", "port": 80,
         "backends": [{"address": "2001:db8:11::8"}]})
    other = VipSpec.model_validate(
        {"protocol": "tcp", "address": "2001:db8::10", "port": 81,
         "backends": [{"address": "2001:db8:11::9"}]})
    lone = VipSpec.model_validate(
        {"protocol": "tcp", "address": "2001:db8::20", "port": 80,
         "backends": [{"address": "2001:db8:11::7"}]})
    s.commit([real, other, lone])
    s.close()
    db = sqlite3.connect(tmp_path / DB_NAME)
    # The twin VIP (number 3) with a zone-id twin of the real VIP's backend (index 4).
    twin = {**json.loads(real.model_dump_json()), "address": "2001:db8::10%x",
            "backends": [{"address": "2001:db8:11::8%zz", "weight": 1, "state": "active"}]}
    db.execute("INSERT INTO vips VALUES (?, ?, ?, ?)",
               ("tcp:[2001:db8::10%x]:80", 99, 3, json.dumps(twin)))
    db.execute("INSERT INTO backends VALUES ('2001:db8:11::8%zz', 4)")
    # A zone id on the other VIP's backend, and on the lone VIP's own address.
    spec = json.loads(other.model_dump_json())
    spec["backends"][0]["address"] = "2001:db8:11::9%eth0"
    db.execute("UPDATE vips SET spec = ? WHERE vip_num = 1", (json.dumps(spec),))
    db.execute("UPDATE backends SET address = '2001:db8:11::9%eth0' WHERE address = "
               "'2001:db8:11::9'")
    spec = {**json.loads(lone.model_dump_json()), "address": "2001:db8::20%eth1"}
    db.execute("UPDATE vips SET spec = ?, id = 'tcp:[2001:db8::20%eth1]:80' WHERE vip_num = 2",
               (json.dumps(spec),))
    db.execute("UPDATE meta SET value = 4 WHERE key = 'next_vip'")
    db.execute("UPDATE meta SET value = 5 WHERE key = 'next_real'")
    db.commit()
    db.close()


def test_a_store_with_zone_ids_loads_without_them_and_twins_dropped(tmp_path: Path) -> None:
    _legacy_zone_store(tmp_path)
    s = Store(tmp_path, LIMITS)
    assert list(s.vips) == ["tcp:[2001:db8::10]:80", "tcp:[2001:db8::10]:81",
                            "tcp:[2001:db8::20]:80"]
    assert not any("%" in v.model_dump_json() for v in s.vips.values())
    # The real VIP keeps its number and its backend's index; the twin's are free again.
    assert s.vip_nums["tcp:[2001:db8::10]:80"] == 0
    assert s.real_idx == {"2001:db8:11::8": 1, "2001:db8:11::9": 2, "2001:db8:11::7": 3}
    assert any("dropped VIP tcp:[2001:db8::10%x]:80" in f for f in s.zone_fixes)
    assert s._vip_alloc.free.keys() == {3} and s._real_alloc.free.keys() == {4}
    # Written back in one go: the next load finds nothing to fix, and changes work.
    gen = s.generation
    s.commit(deletes=["tcp:[2001:db8::10]:80"])
    s.close()
    again = Store(tmp_path, LIMITS)
    assert again.zone_fixes == [] and again.generation == gen + 1
    assert list(again.vips) == ["tcp:[2001:db8::10]:81", "tcp:[2001:db8::20]:80"]
    again.close()


def test_the_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        s = Store(tmp_path, LIMITS)
        s.commit([vip(80, "198.18.1.1")])
        files = [tmp_path / DB_NAME, tmp_path / f"{DB_NAME}-wal", tmp_path / f"{DB_NAME}-shm"]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        s.close()
        # A store an older version left world-readable is closed off when opened.
        (tmp_path / DB_NAME).chmod(0o644)
        Store(tmp_path, LIMITS).close()
        assert stat.S_IMODE((tmp_path / DB_NAME).stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_running_out_of_backend_slots_names_the_field(tmp_path: Path) -> None:
    s = Store(tmp_path, LIMITS)
    many = [f"198.18.1.{i}" for i in range(1, LIMITS.max_backends + 2)]
    with pytest.raises(LimitReached, match=r"^backends: no free backend slots") as e:
        s.commit([vip(80, *many)])
    assert e.value.field == "backends"
