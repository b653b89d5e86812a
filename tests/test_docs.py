"""The README and the configuration reference cannot drift from the loader.

* Every ```yaml block of README.md and docs/configuration.md goes through
  ``ai-saas check-config`` (``load_config``). An HTML comment on the line before a block
  says what it is:

  - none: a complete file; it must load as it is.
  - ``<!-- fragment -->``: some sections of a file; they are merged into the starter file
    of ``ai-saas init`` (mappings key by key; lists of mappings item by item, matched on
    ``id``, ``name``, ``path`` or ``metric``, the block's items first), which must load.
  - ``<!-- invalid -->``: a file that must be refused; the next block of the document is
    what ``check-config`` prints on stderr, exactly.
  - ``<!-- file: NAME -->`` (any language): written as NAME beside the document's configs
    (a ``modelCatalog``, say).
  - ``<!-- digest-command -->`` (sh): each line prints the ``sha256:`` digest of ``$KEY``.

* Every key the loader accepts has a row in the table of its section in
  docs/configuration.md (``<!-- keys: PATH -->`` before the table), with its type,
  default, example and use, and the Seed column marks exactly the seed template's keys.
  The accepted keys are not a list kept here: they are recorded from the loader itself
  (every ``_Reader.mapping(value, path, known)`` call while the documents' examples load),
  and a check of config.py's source makes sure every such call was reached.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ai_saas_middleware import config as config_module
from ai_saas_middleware import load_config
from ai_saas_middleware.cli import main
from ai_saas_middleware.gateway import hash_api_key
from ai_saas_middleware.starter import SEED_SECTIONS, render_starter

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "configuration.md"
DOCUMENTS = (README, REFERENCE)
CONFIG_NAME = "ai-saas-config.yaml"
TOP_LEVEL = "(top level)"
IDENTITY = ("id", "name", "path", "metric")  # what a list item is matched on when merged
MARKER = re.compile(r"^<!--\s*(fragment|invalid|file|digest-command|keys)(?::\s*(\S.*?))?\s*-->$")
COLUMNS = ["Key", "Type", "Default", "Example", "Seed", "What it does"]


@dataclass(frozen=True)
class Block:
    """A fenced block of a document, with the marker comment before it (if any)."""

    document: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str | None
    argument: str | None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks_of(document: Path) -> list[Block]:
    lines = document.read_text("utf-8").splitlines()
    found: list[Block] = []
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if fence is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = MARKER.match(previous)
        found.append(Block(document, i + 1, fence[1], "\n".join(lines[i + 1:end]) + "\n",
                           marker[1] if marker else None, marker[2] if marker else None))
        previous = ""
        i = end + 1
    return found


def yaml_blocks() -> Iterator[Any]:
    for document in DOCUMENTS:
        for block in blocks_of(document):
            if block.language == "yaml":
                yield pytest.param(block, id=block.where)


def merge(base: Any, extra: Any) -> Any:
    """``extra`` laid over ``base``: mappings key by key, lists of mappings item by item."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(extra, list):
        def identity(item: Any) -> Any:
            if isinstance(item, dict):
                return next(((k, item[k]) for k in IDENTITY if k in item), None)
            return None

        given = [identity(item) for item in extra]
        if None in given:
            return extra
        return [*extra, *(item for item in base if identity(item) not in given)]
    return extra


def starter() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(render_starter().text)
    return data


def prepare(block: Block, directory: Path) -> Path:
    """The block as the config file it stands for, with its document's files beside it."""
    for other in blocks_of(block.document):
        if other.marker == "file":
            assert other.argument, f"{other.where}: <!-- file: NAME --> needs a NAME"
            (directory / other.argument).write_text(other.text, "utf-8")
    path = directory / CONFIG_NAME
    if block.marker == "fragment":
        path.write_text(yaml.safe_dump(prepare_in_memory(block), sort_keys=False), "utf-8")
    else:
        path.write_text(block.text, "utf-8")  # as written: its decimals stay exact
    return path


def prepare_in_memory(block: Block) -> dict[str, Any]:
    """The block as the configuration it stands for: a fragment merged into the starter."""
    completed: dict[str, Any] = merge(starter(), yaml.safe_load(block.text)) \
        if block.marker == "fragment" else yaml.safe_load(block.text)
    return completed


# --------------------------------------------------------------------------- the blocks


@pytest.mark.parametrize("block", list(yaml_blocks()))
def test_every_yaml_block_loads_through_check_config(
        block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert block.marker in (None, "fragment", "invalid"), \
        f"{block.where}: a yaml block is a config: no marker, fragment or invalid"
    prepare(block, tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths (modelCatalog) as a user's would be
    monkeypatch.delenv("AI_SAAS_CONFIG", raising=False)

    code = main(["check-config", CONFIG_NAME])
    out, err = capsys.readouterr()
    if block.marker == "invalid":
        following = blocks_of(block.document)
        shown = following[following.index(block) + 1]
        assert code == 2, f"{block.where}: loads, but the document says it is refused"
        assert err == shown.text, f"{block.where}: check-config prints otherwise than " \
                                  f"{shown.where} shows"
    else:
        assert code == 0, f"{block.where} does not load:\n{err}"
        assert err == "" and "is valid" in out


def test_the_readme_example_names_no_missing_file_undefined_tier_or_placeholder() -> None:
    """What made the README's example fail check-config before: a catalog file it does
    not ship, a tier no section defines, a placeholder for the key digest."""
    examples = [b for b in blocks_of(README)
                if b.language == "yaml" and "tenants" in yaml.safe_load(b.text)]
    assert examples

    for example in examples:
        data = yaml.safe_load(example.text)
        assert "modelCatalog" not in data, example.where
        tiers = load_config(prepare_in_memory(example)).tiers
        for tenant in data["tenants"]:
            assert tenant["tier"] in tiers, example.where
            for key in tenant["apiKeys"]:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", key), example.where


def test_the_readme_links_the_configuration_reference() -> None:
    text = README.read_text("utf-8")
    section = text[text.index("## Configuration\n"):]
    section = section[:section.index("\n## ", 1)]
    assert "](docs/configuration.md)" in section
    assert "ai-saas init" in section


def test_the_digest_commands_print_what_the_loader_expects(tmp_path: Path) -> None:
    commands = [line for block in blocks_of(REFERENCE) if block.marker == "digest-command"
                for line in block.text.splitlines() if line.strip()]
    assert len(commands) >= 2  # a Python and a shell one

    for key in ("ais_0123456789abcdef0123456789abcdef_acme", "clé-à-accents €"):
        expected = "sha256:" + hash_api_key(key)  # what a request's key is matched as
        for command in commands:
            result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60,
                                    env={"KEY": key, "PATH": f"{Path(sys.executable).parent}"
                                         ":/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.decode() == expected + "\n", command
        config = copy.deepcopy(starter())
        config["tenants"] = [{"id": "acme", "tier": "pro", "apiKeys": [expected]}]
        assert load_config(config).tenants["acme"].api_key_hashes == \
            (hashlib.sha256(key.encode("utf-8")).hexdigest(),)


# --------------------------------------------------------------------------- every key


def accepted_keys(monkeypatch: pytest.MonkeyPatch, directory: Path) -> dict[str, set[str]]:
    """Section path -> the keys the loader accepts there, recorded from ``_Reader.mapping``
    while the starter and every example of the documents load."""
    accepted: dict[str, set[str]] = {}
    reached: set[int] = set()
    original = config_module._Reader.mapping

    def recording(self: Any, value: Any, path: str, known: tuple[str, ...]) -> Any:
        reached.add(sys._getframe(1).f_lineno)
        section = re.sub(r"\[\d+\]", "[]", path) or TOP_LEVEL
        accepted.setdefault(section, set()).update(known)
        return original(self, value, path, known)

    monkeypatch.setattr(config_module._Reader, "mapping", recording)
    monkeypatch.chdir(directory)
    sources: list[dict[str, Any]] = [starter()]
    for document in DOCUMENTS:
        for block in blocks_of(document):
            if block.language == "yaml" and block.marker != "invalid":
                prepare(block, directory)
                sources.append(prepare_in_memory(block))
    for source in sources:
        load_config(source)

    # Every place config.py reads a mapping must have been reached, or its keys were not
    # recorded: then the documents need an example of that section.
    tree = ast.parse(inspect.getsource(config_module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "mapping":
            assert any(node.lineno <= line <= (node.end_lineno or node.lineno)
                       for line in reached), \
                (f"config.py:{node.lineno} reads a section no example of the documents "
                 "reaches: add one (a fragment will do) so its keys are checked")
    return accepted


def documented_keys() -> dict[str, dict[str, list[str]]]:
    """Section path -> key -> the cells of its row, from docs/configuration.md's tables."""
    tables: dict[str, dict[str, list[str]]] = {}
    lines = REFERENCE.read_text("utf-8").splitlines()
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if marker is None or marker[1] != "keys":
            continue
        section = marker[2]
        assert section not in tables, f"two tables for {section}"
        rows = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            rows.append([cell.strip() for cell in row.strip()[1:-1].split("|")])
        assert rows[0] == COLUMNS, f"{section}: the columns are {COLUMNS}"
        assert set("".join(rows[1])) <= set("|-"), f"{section}: no header separator"
        table: dict[str, list[str]] = {}
        for cells in rows[2:]:
            assert len(cells) == len(COLUMNS), f"{section}: {cells[0]}: {len(cells)} cells"
            key = re.fullmatch(r"`([A-Za-z0-9]+)`", cells[0])
            assert key, f"{section}: the key cell {cells[0]!r} is not `key`"
            table[key[1]] = cells
        tables[section] = table
    return tables


def seed_keys() -> dict[str, set[str]]:
    """Section path -> the keys the seed template writes there."""
    found: dict[str, set[str]] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            found.setdefault(path or TOP_LEVEL, set()).update(node)
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for item in node:
                walk(item, f"{path}[]")

    walk(yaml.safe_load(SEED_SECTIONS), "")
    return found


def test_the_reference_documents_every_key_the_loader_accepts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    accepted = accepted_keys(monkeypatch, tmp_path)
    documented = documented_keys()
    seed = seed_keys()

    assert set(accepted) == set(documented), \
        (f"sections the loader reads without a table: {sorted(set(accepted) - set(documented))}; "
         f"tables of no section: {sorted(set(documented) - set(accepted))}")
    for section, keys in accepted.items():
        table = documented[section]
        assert set(table) == keys, \
            (f"{section}: keys without a row: {sorted(keys - set(table))}; rows of keys the "
             f"loader refuses: {sorted(set(table) - keys)}")
        for key, (_, kind, default, example, is_seed, use) in table.items():
            assert kind and default and example and use, f"{section}.{key}: an empty cell"
            assert is_seed in ("", "seed"), f"{section}.{key}: Seed is 'seed' or empty"
            assert (is_seed == "seed") == (key in seed.get(section, set())), \
                f"{section}.{key}: the Seed column says otherwise than the seed template"
