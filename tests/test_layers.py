"""The layout's rules, checked by tools rather than by review: no import cycles, the serving path
free of offline code and scikit-learn, size limits, no private names across modules, and docs
that stay inside the repository. (The layer contracts themselves: `lint-imports`, run by
`make test` from pyproject.toml's [tool.importlinter].)"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serve_app", "deployments", "loadtests")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
LONG_REASON = "Long because"
"""A docstring line starting with this says why a module or function is over the limit."""


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = set()
                while True:
                    m = stack.pop()
                    on.discard(m)
                    scc.add(m)
                    if m == node:
                        break
                if len(scc) > 1:
                    out.append(scc)
    return out


def test_no_import_cycles_between_any_modules():
    # every import counts, function-level (lazy) ones included
    graph = grimp.build_graph(*PACKAGES)
    assert graph.modules, "grimp found no modules"
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("x.a", "x.b"), ("x.b", "x.c"), ("x.c", "x.a"), ("x.c", "x.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [{"x.a", "x.b", "x.c"}]


SERVING_IMPORTS = """
import json, sys
sys.modules["sklearn"] = None  # as in a serving install without scikit-learn: importing it would fail
import deployments.router, deployments.generator, deployments.prefill, deployments.request_router, serve_app.app
from serve_app.config import AppConfig
from serve_app.engines.load import make_engine
engine = make_engine(AppConfig(), "slow")  # the HF engine of a pool, model and probe loaded
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("sklearn.", "serve_app.offline")))))
"""


def test_serving_deployments_load_no_offline_module_and_need_no_sklearn():
    out = subprocess.run([sys.executable, "-c", SERVING_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _docstring_has_reason(node) -> bool:
    doc = ast.get_docstring(node) or ""
    return any(line.strip().startswith(LONG_REASON) for line in doc.splitlines())


def test_modules_and_functions_stay_small_or_say_why():
    over = []
    for path in _sources():
        src = path.read_text()
        tree = ast.parse(src)
        rel = path.relative_to(ROOT)
        if len(src.splitlines()) > MAX_MODULE_LINES and not _docstring_has_reason(tree):
            over.append(f"{rel}: {len(src.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not _docstring_has_reason(node):
                    over.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert over == []


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_docs_and_code_point_only_inside_the_repository():
    hits = []
    targets = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *_sources()]
    for path in targets:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "shared/" in line or "DESIGN.md" in line or "DESIGN §" in line:
                hits.append(f"{path.relative_to(ROOT)}:{i}")
    assert (ROOT / "docs" / "method.md").is_file() and (ROOT / "docs" / "architecture.md").is_file()
    assert hits == []
