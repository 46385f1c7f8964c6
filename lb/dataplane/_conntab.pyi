"""Type stub of the C extension lb/dataplane/_conntab.c (see its header comment)."""

from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

# 8-byte integers: a numpy array (its buffer protocol is typed from Python 3.12 only) or any
# buffer of them, like array("Q").
_Words: TypeAlias = NDArray[np.integer[Any]] | Buffer

def cas_many(table: Buffer, offsets: _Words, expected: _Words, new: int, /) -> int: ...
