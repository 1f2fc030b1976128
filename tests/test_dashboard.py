"""The Grafana dashboard (cluster/grafana/kvswitch-dashboard.json) against the metrics that
deployments/metrics.py defines: every metric a panel queries exists, under the name Ray 2.60 exports it
by (Counter ``x`` → ``ray_x_total``, Histogram → ``ray_x_bucket``/``_sum``/``_count``, Gauge → ``ray_x``),
is used as its kind allows (counters inside rate/increase, gauges not), and carries every label the
panel filters or groups by; and every defined metric is on some panel. No Ray cluster is started: Ray's
metric objects are built without ``ray.init``, and the naming is checked against Ray's own exporter in
a subprocess.

The helpers up to ``exposed_metric_names`` need only the standard library, so the live service test can
check the panels against the real ``/metrics`` text (a metric that never fired is not exported yet)::

    from test_dashboard import DASHBOARD, dashboard_metric_names, exposed_metric_names, load_dashboard
    missing = dashboard_metric_names(load_dashboard(DASHBOARD)) - exposed_metric_names(text)
"""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster" / "grafana" / "kvswitch-dashboard.json"
METRICS_SOURCE = ROOT / "deployments" / "metrics.py"
METRIC_NAME = re.compile(r"\bray_kvswitch_[a-z0-9_]+")


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too (Grafana nests them under the row's ``panels``)."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = [(f"panel {p.get('title')!r}", t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            out.append((f"variable {var['name']!r}", query["query"] if isinstance(query, dict) else query))
    return out


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """The ``ray_kvswitch_*`` series names the dashboard's queries read."""
    return {name for _, expr in dashboard_exprs(dashboard) for name in METRIC_NAME.findall(expr)}


def exposed_metric_names(text: str) -> set[str]:
    """The series names in a Prometheus text exposition (what ``/metrics`` returns)."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if m and not line.startswith("#"):
            names.add(m.group(0))
    return names


# ------------------------------------------------------------------------------- PromQL reading

MATCHER = r'[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(r"(ray_kvswitch_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(ray_kvswitch_[a-z0-9_]+)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")
RANGE_FUNCTIONS = re.compile(r"\b(?:rate|irate|increase)\(\s*$")
GRAFANA_VARIABLES = {"__range", "__rate_interval", "__interval"}


def _balanced(expr: str, start: int, step: int) -> str:
    """The parenthesised group that opens (step 1) or closes (step -1) at ``expr[start]``."""
    depth, i = 0, start
    while 0 <= i < len(expr):
        depth += {"(": 1, ")": -1}.get(expr[i], 0) * step
        if depth == 0:
            return expr[min(start, i):max(start, i) + 1]
        i += step
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def groupings(expr: str) -> list[tuple[set[str], set[str]]]:
    """(labels, metrics aggregated) for each ``by``/``without`` clause: ``sum(...) by (l)`` or ``sum by (l) (...)``."""
    out = []
    for m in GROUPING.finditer(expr):
        before = expr[:m.start()].rstrip()
        scope = _balanced(expr, len(before) - 1, -1) if before.endswith(")") else _balanced(expr, expr.index("(", m.end()), 1)
        labels = {label.strip() for label in m.group(2).split(",") if label.strip()}
        out.append((labels, set(METRIC_NAME.findall(scope))))
    return out


def selector_labels(body: str | None) -> set[str] | None:
    """Label names of a ``{...}`` selector body; None when it is not a plain list of matchers."""
    if body is None:
        return set()
    if not re.fullmatch(rf"\s*(?:{MATCHER}\s*(?:,\s*{MATCHER}\s*)*,?)?\s*", body):
        return None
    return set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"', body))


# ------------------------------------------------------------------------------- the checks


def name_problems(dashboard: dict, exported: dict[str, str]) -> list[str]:
    """Series a query names that no metric exports, and counters/gauges used against their kind.
    ``exported``: exported series name → "counter" (Counter totals, histogram parts) or "gauge"."""
    problems = []
    for where, expr in dashboard_exprs(dashboard):
        for m in METRIC_NAME.finditer(expr):
            name, kind = m.group(0), exported.get(m.group(0))
            in_range_function = bool(RANGE_FUNCTIONS.search(expr[:m.start()]))
            if kind is None:
                problems.append(f"{where}: {name} is not a series deployments/metrics.py exports")
            elif kind == "counter" and not in_range_function and not where.startswith("variable"):
                problems.append(f"{where}: counter {name} outside rate()/increase()")
            elif kind == "gauge" and in_range_function:
                problems.append(f"{where}: gauge {name} inside rate()/increase()")
    return problems


def label_problems(dashboard: dict, labels: dict[str, set[str]]) -> list[str]:
    """Labels a query filters or groups by that its metric does not carry, and legends naming a label
    the query's result does not keep. ``labels``: exported series name → the labels it carries."""
    problems = []
    for where, expr in dashboard_exprs(dashboard):
        for m in SELECTOR.finditer(expr):
            used = selector_labels(m.group(2))
            if used is None:
                problems.append(f"{where}: unreadable selector {m.group(0)!r}")
            elif m.group(1) in labels and used - labels[m.group(1)]:
                problems.append(f"{where}: {m.group(1)} has no label {sorted(used - labels[m.group(1)])}")
        for grouped, metrics in groupings(expr):
            for name in sorted(metrics & labels.keys()):
                if grouped - labels[name]:
                    problems.append(f"{where}: grouped by {sorted(grouped - labels[name])}, which {name} does not carry")
        for name, label in LABEL_VALUES.findall(expr):
            if name in labels and label not in labels[name]:
                problems.append(f"{where}: label_values of {name} by {label!r}, which it does not carry")
    for panel in dashboard_panels(dashboard):
        for t in panel.get("targets", []):
            kept = set().union(*(g for g, _ in groupings(t.get("expr", "")))) if t.get("expr") else set()
            legend = set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", t.get("legendFormat", "")))
            if legend - kept:
                problems.append(f"panel {panel.get('title')!r}: legend names {sorted(legend - kept)}, not kept by its query")
    return problems


def structure_problems(dashboard: dict) -> list[str]:
    problems = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no Prometheus datasource variable named 'datasource'")
    for key in ("title", "uid", "schemaVersion", "panels"):
        if key not in dashboard:
            problems.append(f"no {key}")
    panels = dashboard_panels(dashboard)
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids missing or repeated: {ids}")
    boxes = []
    for p in panels:
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] < 0 or g["x"] + g["w"] > 24:
            problems.append(f"panel {p.get('title')!r}: gridPos {g}")
            continue
        for other_title, o in boxes:
            if g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"] and g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"]:
                problems.append(f"panel {p.get('title')!r} overlaps {other_title!r}")
        boxes.append((p.get("title"), g))
        if p.get("type") == "row":
            continue
        if p.get("datasource") != "${datasource}" or not p.get("targets"):
            problems.append(f"panel {p.get('title')!r}: no targets or not on ${{datasource}}")
        refs = [t.get("refId") for t in p.get("targets", [])]
        if len(refs) != len(set(refs)) or not all(t.get("expr") for t in p.get("targets", [])):
            problems.append(f"panel {p.get('title')!r}: targets need an expr and distinct refIds")
    for where, expr in dashboard_exprs(dashboard):
        for var in re.findall(r"\$\{?(\w+)", expr):
            if var not in variables and var not in GRAFANA_VARIABLES:
                problems.append(f"{where}: ${var} is not a dashboard variable")
    return problems


# ------------------------------------------------------------------------------- what metrics.py defines

# Labels every kvswitch series carries besides its tag_keys: Serve adds deployment, replica and
# application inside a replica (ray.serve.metrics); ray_io_cluster is set by the scrape config on
# KubeRay (PodMonitor) and is what Ray's own dashboards filter clusters by.
PLATFORM_LABELS = {"ray_io_cluster"}


@pytest.fixture(scope="module")
def defined():
    """Every metric object deployments/metrics.py builds, as (object, kind)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    from deployments.metrics import GeneratorMetrics, RouterMetrics

    out = []
    for holder in (RouterMetrics(), GeneratorMetrics("fast")):
        for obj in vars(holder).values():
            for kind in (Histogram, Counter, Gauge):
                if isinstance(obj, kind):
                    out.append((obj, kind.__name__))
    return out


def _exported(defined) -> tuple[dict[str, str], dict[str, set[str]], dict[str, list[str]]]:
    """(series → "counter"/"gauge", series → labels, metric name → its series)."""
    from ray.serve.metrics import APPLICATION_TAG, DEPLOYMENT_TAG, REPLICA_TAG

    kinds, labels, series = {}, {}, {}
    for obj, kind in defined:
        name, tags = obj.info["name"], set(obj.info["tag_keys"]) | {DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG} | PLATFORM_LABELS
        base = f"ray_{name}"
        parts = {"Counter": {f"{base}_total": tags}, "Gauge": {base: tags},
                 "Histogram": {f"{base}_bucket": tags | {"le"}, f"{base}_sum": tags, f"{base}_count": tags}}[kind]
        series[name] = sorted(parts)
        labels.update(parts)
        kinds.update({s: "gauge" if kind == "Gauge" else "counter" for s in parts})
    return kinds, labels, series


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def test_dashboard_is_a_grafana_model_on_the_datasource_variable(dashboard):
    assert structure_problems(dashboard) == []
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] == "kvswitchDashboard"


def test_every_defined_metric_is_built_by_this_test(defined):
    """The test instantiates RouterMetrics and GeneratorMetrics; metrics.py must define no other metric."""
    tree = ast.parse(METRICS_SOURCE.read_text())
    in_source = {node.args[0].value for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Counter", "Gauge", "Histogram")
                 and node.args and isinstance(node.args[0], ast.Constant)}
    assert in_source == {obj.info["name"] for obj, _ in defined}


def test_every_panel_metric_is_exported_under_that_name_and_used_as_its_kind(dashboard, defined):
    kinds, _, _ = _exported(defined)
    assert dashboard_metric_names(dashboard), "no ray_kvswitch_ series found in the dashboard"
    assert name_problems(dashboard, kinds) == []


def test_every_label_a_panel_uses_is_carried_by_its_metric(dashboard, defined):
    _, labels, _ = _exported(defined)
    assert label_problems(dashboard, labels) == []


def test_every_defined_metric_is_on_a_panel(dashboard, defined):
    _, _, series = _exported(defined)
    on_panels = {name for where, expr in dashboard_exprs(dashboard) if where.startswith("panel") for name in METRIC_NAME.findall(expr)}
    assert [name for name, parts in series.items() if not on_panels & set(parts)] == []


def test_the_checks_catch_a_broken_panel(dashboard, defined):
    kinds, labels, _ = _exported(defined)

    def broken(old: str, new: str) -> dict:
        d = copy.deepcopy(dashboard)
        hits = 0
        for p in dashboard_panels(d):
            for t in p.get("targets", []):
                if old in t.get("expr", ""):
                    t["expr"], hits = t["expr"].replace(old, new), hits + 1
        assert hits, old
        return d

    assert name_problems(broken("ray_kvswitch_requests_total", "ray_kvswitch_request_total"), kinds)
    assert name_problems(broken("ray_kvswitch_switches_total", "ray_kvswitch_switches"), kinds)
    assert name_problems(broken("sum(ray_kvswitch_queue_depth", "sum(rate(ray_kvswitch_queue_depth"), kinds)
    assert label_problems(broken("by (direction)", "by (route)"), labels)
    assert label_problems(broken("by (le)", "by (pool, le)"), labels)
    assert label_problems(broken('ray_kvswitch_running{application', 'ray_kvswitch_running{pod="x",application'), labels)
    assert label_problems(broken("by (pool)", "by (route)"), labels)
    d = broken("by (status)", "")
    assert label_problems(d, labels)  # its legend still names {{status}}
    assert structure_problems(broken('"$Application"', '"$App"'))


def test_exposed_metric_names_reads_a_prometheus_exposition():
    text = ('# HELP ray_kvswitch_requests_total x\n# TYPE ray_kvswitch_requests_total counter\n'
            'ray_kvswitch_requests_total{route="fast",reason="easy"} 2.0\nray_kvswitch_queue_depth 0\n\n')
    assert exposed_metric_names(text) == {"ray_kvswitch_requests_total", "ray_kvswitch_queue_depth"}


EXPORT = """
import json, sys
import prometheus_client
from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder
recorder = OpenTelemetryMetricRecorder()
for kind, name, tags, boundaries in json.loads(sys.argv[1]):
    if kind == "Counter":
        recorder.register_counter_metric(name, "d")
    elif kind == "Gauge":
        recorder.register_gauge_metric(name, "d")
    else:
        recorder.register_histogram_metric(name, "d", boundaries)
    recorder.set_metric_value(name, {t: "x" for t in tags}, 1.0)
print(prometheus_client.generate_latest().decode())
"""


def test_ray_exports_every_panel_series_under_the_name_the_dashboard_uses(dashboard, defined):
    """Ray 2.60's exporter itself (its OpenTelemetry recorder and Prometheus reader, which the dashboard
    agent runs; no cluster), fed every defined metric as the worker registers it: the dashboard's series
    are what it exports."""
    specs = [(kind, obj.info["name"], list(obj.info["tag_keys"]), getattr(obj, "boundaries", None)) for obj, kind in defined]
    out = subprocess.run([sys.executable, "-c", EXPORT, json.dumps(specs)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(dashboard_metric_names(dashboard) - exposed_metric_names(out.stdout)) == []
