"""Locality-sensitive hashing of cache vectors: which stored entries a lookup fetches.

Lua cannot score thousands of vectors quickly (about 30 us a 256-dim candidate), and a
process-local copy of every tenant's vectors costs memory in every process, so a
partition with many entries is searched through buckets: ``tables`` hash tables of
``bits`` sign bits each (random hyperplane LSH, Charikar 2002). Two unit vectors at angle
``theta`` agree on one bit with probability ``1 - theta/pi``; at the default threshold's
raw cosine (about 0.835 for ``ngram``, 33 degrees) that is 0.81 a bit, 0.19 a table of 8
bits (0.13 a table of 10, the default: ``cache/policy.py``), and 97% (89% with 10 bits)
that at least one of 16 tables puts the pair in one bucket. The lookup
script unions the query's buckets, ranks the entries by how many tables they share with
the query, and returns the best few (``cache_lookup.lua``); the client scores those
exactly (:func:`~ai_saas_middleware.cache.match.find_match`, guard included).

The hyperplanes are +-1 vectors (Rademacher projections, as good as Gaussian ones for
sign hashing) drawn from SHAKE-256 of a fixed seed: the same codes in every process, on
every machine, with any numpy, forever; a change is a new :data:`LSH_VERSION`, which is
part of every partition id, so old buckets are never read with new codes.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["LSH_VERSION", "SignHasher"]

LSH_VERSION = "1"


class SignHasher:
    """Bucket codes of unit vectors: ``tables`` codes of ``bits`` sign bits each.

    Args:
        dim: the embedder's vector length.
        tables: hash tables (more: better recall, more candidates).
        bits: bits a table (more: smaller buckets, worse recall); at most 16.
    """

    def __init__(self, dim: int, tables: int = 16, bits: int = 8):
        if not 1 <= bits <= 16 or tables < 1 or dim < 1:
            raise ValueError(f"SignHasher: 1 <= bits <= 16, tables >= 1, dim >= 1; got "
                             f"dim={dim}, tables={tables}, bits={bits}")
        self.dim, self.tables, self.bits = dim, tables, bits
        self.version = f"{LSH_VERSION}-{tables}x{bits}"
        rows = tables * bits
        raw = hashlib.shake_256(f"ai-saas-lsh:{self.version}:{dim}".encode()).digest(
            (rows * dim + 7) // 8)
        signs = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:rows * dim]
        self._planes = (signs.astype(np.float32) * 2.0 - 1.0).reshape(rows, dim)
        self._weights = (1 << np.arange(bits, dtype=np.int64))
        self._width = (bits + 3) // 4  # hex digits a code

    def codes(self, vector: NDArray[np.float32]) -> list[str]:
        """One hex code per table for a unit vector of shape ``(dim,)``."""
        projected = self._planes @ vector.astype(np.float32, copy=False)
        bits = (projected >= 0).reshape(self.tables, self.bits).astype(np.int64)
        values = bits @ self._weights
        width = self._width
        return [format(int(v), f"0{width}x") for v in values]
