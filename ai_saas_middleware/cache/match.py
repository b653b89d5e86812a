"""The semantic match: the best stored question of a partition that answers the new one.

Given the new request's vector and text and the entries of its partition (same tenant,
same earlier turns, system prompt, tools and parameters: :mod:`.request_key`), the match
is the candidate with the highest calibrated score at or above the threshold that the
lexical guard and the optional verifier accept. Pure; numpy does the arithmetic, so
10,000 candidates cost one matrix-vector product (benchmarks/README.md, "Issue 11").

Candidates of another embedder (another ``embedder_id``) are never compared: their
vectors live in a different space, and a cosine between them means nothing. A
:class:`CandidateSet` holds the vectors of one embedder only; building one from mixed
entries drops the others.

Order of checks, and why: the guard is cheap and runs on candidates in score order until
one passes; the verifier (possibly a model call) is asked about at most
``max_verifications`` of the guard-accepted ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .embedders import Embedder
from .guard import LexicalGuard, Verifier

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - embedders raised already
    raise ImportError("ai_saas_middleware.cache.match needs numpy: "
                      "pip install 'ai-saas-middleware[cache]'") from exc

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["Candidate", "CandidateSet", "Match", "find_match"]

_GUARD = LexicalGuard()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One stored entry as the match sees it."""

    entry_id: str
    text: str
    embedder_id: str
    vector: NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class CandidateSet:
    """The candidates of one partition that share one embedder, vectors stacked.

    ``vectors`` has shape ``(len(entry_ids), dim)``, float32, unit rows.
    """

    embedder_id: str
    entry_ids: tuple[str, ...]
    texts: tuple[str, ...]
    vectors: NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.entry_ids) or len(
                self.texts) != len(self.entry_ids):
            raise ValueError("CandidateSet: one text and one vector row per entry id")

    def __len__(self) -> int:
        return len(self.entry_ids)

    @classmethod
    def of(cls, embedder_id: str, candidates: Iterable[Candidate]) -> CandidateSet:
        """The candidates made by ``embedder_id``; every other one is left out."""
        own = [c for c in candidates if c.embedder_id == embedder_id]
        if not own:
            return cls(embedder_id, (), (), np.zeros((0, 0), dtype=np.float32))
        return cls(embedder_id, tuple(c.entry_id for c in own), tuple(c.text for c in own),
                   np.stack([np.asarray(c.vector, dtype=np.float32) for c in own]))

    @classmethod
    def from_buffer(cls, embedder_id: str, entry_ids: Sequence[str], texts: Sequence[str],
                    buffer: bytes, dim: int) -> CandidateSet:
        """From vectors stored back to back as little-endian float32 (how a store keeps
        them): no copy per entry."""
        vectors = np.frombuffer(buffer, dtype="<f4").reshape(len(entry_ids), dim)
        return cls(embedder_id, tuple(entry_ids), tuple(texts), vectors)


@dataclass(frozen=True, slots=True)
class Match:
    """The entry that answers the new request, and how close it was."""

    entry_id: str
    text: str
    cosine: float
    score: float


def find_match(query_vector: NDArray[np.float32], query_text: str,
               candidates: CandidateSet | Iterable[Candidate], *, embedder: Embedder,
               threshold: float, guard: Verifier | None = _GUARD,
               verifier: Verifier | None = None,
               max_verifications: int = 1) -> Match | None:
    """The best candidate at or above ``threshold`` that the guard and verifier accept.

    Args:
        query_vector: the new request's semantic text embedded by ``embedder``.
        query_text: that text (the guard and verifier read it).
        candidates: entries of the request's partition; those of another embedder are
            ignored, never compared.
        embedder: the embedder of ``query_vector``; its id selects the comparable
            candidates and its calibration turns cosines into scores.
        threshold: ``cache.similarityThreshold``, on the calibrated scale.
        guard: the lexical guard (the built-in one unless replaced; ``None`` turns it off,
            for evaluation only).
        verifier: an optional second opinion, asked last.
        max_verifications: how many guard-accepted candidates the verifier may be asked
            about before the lookup gives up (each may be a model call).

    Returns:
        The :class:`Match`, or ``None`` (a miss).
    """
    embedder_id = embedder.embedder_id
    if not isinstance(candidates, CandidateSet):
        candidates = CandidateSet.of(embedder_id, candidates)
    if candidates.embedder_id != embedder_id or len(candidates) == 0:
        return None
    if candidates.vectors.shape[1] != query_vector.shape[-1]:
        return None  # same id, other shape: a corrupt entry, never a match
    cosines = candidates.vectors @ query_vector.astype(np.float32, copy=False)
    # Only cosines that can reach the threshold get scored and sorted: the calibration
    # is monotone, so that is a cut on raw cosine.
    floor = _cosine_floor(embedder, threshold)
    above = np.flatnonzero(cosines >= floor)
    if above.size == 0:
        return None
    scores = np.asarray(embedder.score(cosines[above]), dtype=np.float64)
    keep = scores >= threshold
    above, scores = above[keep], scores[keep]
    verifications = 0
    for rank in np.argsort(-scores, kind="stable"):
        index = int(above[rank])
        text = candidates.texts[index]
        if guard is not None and not _accepts(guard, query_text, text):
            continue
        if verifier is not None:
            if verifications >= max_verifications:
                return None
            verifications += 1
            if not _accepts(verifier, query_text, text):
                continue
        return Match(candidates.entry_ids[index], text, float(cosines[index]),
                     float(scores[rank]))
    return None


def _accepts(verifier: Verifier, new_text: str, cached_text: str) -> bool:
    try:
        return bool(verifier.accepts(new_text, cached_text))
    except Exception:
        return False  # a verifier that fails vetoes: a miss costs money, a wrong hit trust


def _cosine_floor(embedder: Embedder, threshold: float) -> float:
    calibration = getattr(embedder, "calibration", None)
    cosine_at = getattr(calibration, "cosine_at", None)
    if cosine_at is None:
        return -1.0
    # A hair below, so float rounding in the map never drops a candidate exactly at it.
    return float(cosine_at(threshold)) - 1e-6
