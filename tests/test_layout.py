"""The package's layout: its modules import one another without a circle, and an adapter
does not lean on another framework's adapter. Read from the source (every import, those
under ``TYPE_CHECKING`` included), so that no framework needs to be installed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ai_saas_middleware"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from . import background` imports the submodule, not the package
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    assert _circles(_imports()) == []


def test_the_exception_tree_needs_no_request_types() -> None:
    assert _imports()["ai_saas_middleware.errors"] == set()


def test_the_django_adapter_does_not_import_the_wsgi_adapter() -> None:
    imported = {m for name, deps in _imports().items()
                if name.startswith("ai_saas_middleware.django") for m in deps}
    assert "ai_saas_middleware.wsgi" not in imported
    assert "ai_saas_middleware.environ" in imported  # the glue both share


def test_the_wsgi_adapter_still_offers_the_shared_glue() -> None:
    from ai_saas_middleware import environ, wsgi

    assert wsgi.environ_headers is environ.environ_headers
    assert wsgi.request_path is environ.request_path
    assert wsgi.environ_headers({"HTTP_X_API_KEY": "k", "CONTENT_TYPE": "application/json",
                                 "wsgi.input": None}) == {"x-api-key": "k",
                                                          "content-type": "application/json"}
