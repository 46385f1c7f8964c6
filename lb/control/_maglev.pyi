"""Type stub of the C extension lb/control/_maglev.c (see its header comment)."""

from typing_extensions import Buffer

MODE_AUTO: int
MODE_ROUNDS: int
MODE_HEAP: int

def inverses(ring_size: int, /) -> bytes: ...
def populate(
    offsets: Buffer,
    skips: Buffer,
    shifts: Buffer,
    weights: Buffer,
    inverse: Buffer,
    mode: int = ...,
    /,
) -> bytes: ...
def translate(slots: Buffer, table: Buffer, /) -> bytes: ...
def changed(old: Buffer, new: Buffer, /) -> list[int]: ...
