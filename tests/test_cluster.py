"""Multi-node: the cluster manifests (`cluster/`) and a real two-node Ray cluster on this machine.

The manifest tests parse `cluster/ray-cluster.yaml` (Ray cluster launcher) and `cluster/rayservice.yaml`
(KubeRay) and check that both carry `cluster/serve_config.cluster.yaml`, that it validates, and that the
nodes declare what its pins need.

The live test (`pytest -m cluster`, 60-95 s on 2 cores) starts a head node and a worker node with `ray start` (separate
ports and temp dirs, so they share this host with any other Ray instance), deploys the kvswitch app with
the cluster config's pins (fast on the head by its custom resource, slow preferring the worker by label
with the head as the fallback), serves traffic, stops the worker node the way `ray stop` would (SIGTERM to
that node's processes only: `ray stop` itself would stop every Ray process on the host) and shows the slow
pool coming back on the head and answering again. Everything it started is stopped at the end, also on
failure."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema  # noqa: E402

from serve_app.config import DEFAULT_MODEL, AppConfig  # noqa: E402
from serve_app.core.task import is_correct  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY = str(Path(sys.executable).parent / "ray")
GCS_PORT = int(os.environ.get("KVSWITCH_TEST_CLUSTER_PORT", "26379"))  # the other ports of both nodes follow it
HTTP_PORT = int(os.environ.get("KVSWITCH_TEST_CLUSTER_HTTP_PORT", "18531"))
MODEL = "kvswitch-arith-tiny"
EASY, HARD = "What is 2 + 3?", "What is 41 - 17 + 8 - 60 + 5 + 12?"
LONG = "What is 99 - 98 + 97 - 96 + 95 - 94 + 93 - 92 + 91 - 90?"
KEY = "sk-kvswitch-cluster-test-0123456789"
DEPLOYMENTS = ("router", "prefill", "fast", "slow")
PIN_KEYS = ("resources", "label_selector", "fallback_strategy")
LABEL = "kvswitch-node"
RECOVERY_LIMIT_S = 120  # measured ~12 s here (README); generous for a loaded CI box


# ------------------------------------------------------------------------------------- the manifests
def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _serve_config() -> dict:
    return _load("serve_config.cluster.yaml")


def _launcher() -> dict:
    return _load("ray-cluster.yaml")


def _rayservice() -> dict:
    return _load("rayservice.yaml")


def _args(config: dict) -> dict:
    (app,) = config["applications"]
    return app["args"]


def _start_flags(command: str) -> tuple[dict, dict]:
    """--resources and --labels of the `ray start` in a launcher start command."""
    words = shlex.split(command)
    flags = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)
    labels = dict(kv.split("=", 1) for kv in flags.get("--labels", "").split(",") if kv)
    return json.loads(flags.get("--resources", "{}")), labels


def _node_types() -> dict[str, dict]:
    """{"head": {"resources", "labels"}, "worker": ...} as the launcher's node types declare them."""
    launcher = _launcher()
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    (worker,) = (t for name, t in types.items() if name != launcher["head_node_type"])
    return {"head": head, "worker": worker}


def test_both_manifests_carry_the_cluster_serve_config():
    config = _serve_config()
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == config
    launcher = _launcher()
    deploy = " ".join(launcher["head_start_ray_commands"])
    assert "serve deploy /app/cluster/serve_config.cluster.yaml" in deploy
    assert launcher["file_mounts"]["/app"] == "."  # the repository, where the config's model path points
    minor = lambda v: v.split(".")[:2]  # noqa: E731 — pyproject pins ray 2.60.*
    assert minor(service["spec"]["rayClusterConfig"]["rayVersion"]) == minor(ray.__version__) == minor(launcher["docker"]["image"].split(":")[1])


def test_cluster_serve_config_validates_with_ray_and_kvswitch():
    config = _serve_config()
    ServeDeploySchema.model_validate(config)
    args = _args(config)
    assert args["model"].startswith("/app/")  # a path in the image; validate against the local checkout
    cfg = AppConfig.model_validate({**args, "model": str(DEFAULT_MODEL)})
    for name in DEPLOYMENTS:  # what kvswitch passes to Serve for each deployment, checked by Serve's own schema
        RayActorOptionsSchema.model_validate(getattr(cfg, name).options()["ray_actor_options"])
    slow = cfg.slow.options()["ray_actor_options"]
    assert slow["label_selector"] == {LABEL: "worker"} and slow["fallback_strategy"] == [{"label_selector": {LABEL: "head"}}]
    assert "resources" not in slow  # a hard resource pin could not fall back to the head
    for name in ("router", "prefill", "fast"):
        assert getattr(cfg, name).options()["ray_actor_options"]["resources"] == {"kvswitch_head": 1}


def test_cluster_serve_config_is_serve_config_yaml_pinned():
    """Same application as serve_config.yaml; only the model path, the pins, the API-key source, the proxy
    and the bind address differ."""
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config = _serve_config()
    strip = lambda args: {k: ({kk: vv for kk, vv in v.items() if kk not in PIN_KEYS} if k in DEPLOYMENTS else v)  # noqa: E731
                          for k, v in args.items() if k not in ("model", "auth")}
    assert strip(_args(config)) == strip(_args(local))
    assert {k: v for k, v in config["applications"][0].items() if k != "args"} == \
           {k: v for k, v in local["applications"][0].items() if k != "args"}


def test_nodes_declare_what_the_pins_need_in_both_manifests():
    args = _args(_serve_config())
    nodes = _node_types()
    groups = _rayservice()["spec"]["rayClusterConfig"]
    kuberay = {"head": groups["headGroupSpec"], "worker": groups["workerGroupSpecs"][0]}
    assert len(groups["workerGroupSpecs"]) == 1
    launcher = _launcher()
    started = {"head": _start_flags(launcher["head_start_ray_commands"][-1]),
               "worker": _start_flags(launcher["worker_start_ray_commands"][-1])}
    for role in ("head", "worker"):
        custom = {k: v for k, v in nodes[role]["resources"].items() if k not in ("CPU", "GPU", "memory")}
        assert nodes[role]["labels"] == {LABEL: role} == started[role][1] == kuberay[role]["labels"]
        assert custom == started[role][0] == {k: float(v) for k, v in kuberay[role]["resources"].items()}
    for name in ("router", "prefill", "fast"):  # hard pins: only the head has them
        for res in args[name]["resources"]:
            assert res in nodes["head"]["resources"] and res not in nodes["worker"]["resources"]
    assert args["slow"]["label_selector"] == nodes["worker"]["labels"]
    assert args["slow"]["fallback_strategy"] == [{"label_selector": nodes["head"]["labels"]}]
    # the head must hold every replica once the workers are gone
    cfg = AppConfig.model_validate({**args, "model": str(DEFAULT_MODEL)})
    need = sum(getattr(cfg, n).num_cpus * getattr(cfg, n).max_replicas() for n in DEPLOYMENTS)
    assert need <= nodes["head"]["resources"]["CPU"] and need <= float(kuberay["head"]["rayStartParams"]["num-cpus"])


def test_launcher_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher()))


def test_public_bind_only_with_api_keys_from_a_secret():
    config = _serve_config()
    assert config["http_options"]["host"] == "0.0.0.0"
    auth = _args(config)["auth"]
    assert not auth.get("api_keys") and not auth.get("allow_unauthenticated_remote")  # keys never in the file
    env_name = auth["api_keys_env"]
    groups = _rayservice()["spec"]["rayClusterConfig"]
    for group in (groups["headGroupSpec"], *groups["workerGroupSpecs"]):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert "secretKeyRef" in env[env_name]["valueFrom"]
    assert groups["authOptions"]["mode"] == "token"
    launcher = _launcher()
    for cmd in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        assert f'export {env_name}="$(cat ~/.kvswitch/api_keys)"' in cmd
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]


# ----------------------------------------------------------------------------- a real two-node cluster
def _processes(markers: list[tuple[str, ...]]) -> list[psutil.Process]:
    """Processes whose command line contains every string of some marker, and all their descendants."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if any(all(m in cmd for m in marker) for marker in markers):
            found[p.pid] = p
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop(markers: list[tuple[str, ...]], grace_s: float) -> float:
    """SIGTERM (what `ray stop` sends), SIGKILL after the grace period; returns seconds until all exited."""
    t0 = time.monotonic()
    procs = _processes(markers)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return time.monotonic() - t0


class TwoNodes:
    """`ray start --head` and `ray start --address` on this host, each with its own ports and temp dir."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="kvc-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.log = self.root / "ray-start.log"
        self.types = _node_types()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"HF_HUB_OFFLINE": "1", "KVSWITCH_API_KEYS": KEY})  # the replicas inherit their raylet's environment
        p = GCS_PORT
        self.ports = {"head": dict(node=p + 1, object=p + 2, agent=p + 4, agent_grpc=p + 5, runtime_env=p + 6, metrics=p + 7, workers=p + 21),
                      "worker": dict(node=p + 11, object=p + 12, agent=p + 14, agent_grpc=p + 15, runtime_env=p + 16, metrics=p + 17,
                                     workers=p + 121)}

    def _node_args(self, role: str) -> list[str]:
        t, ports = self.types[role], self.ports[role]
        custom = {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU", "memory")}
        return ["--num-cpus", "2", "--resources", json.dumps(custom), "--labels", ",".join(f"{k}={v}" for k, v in t["labels"].items()),
                "--node-manager-port", str(ports["node"]), "--object-manager-port", str(ports["object"]),
                "--dashboard-agent-listen-port", str(ports["agent"]), "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
                "--runtime-env-agent-port", str(ports["runtime_env"]), "--metrics-export-port", str(ports["metrics"]),
                "--min-worker-port", str(ports["workers"]), "--max-worker-port", str(ports["workers"] + 99),
                "--temp-dir", str(self.root / role), "--object-store-memory", str(200 << 20), "--disable-usage-stats"]

    def _ray(self, *args: str) -> None:
        with open(self.log, "ab") as out:  # a file, not a pipe: the daemons `ray start` leaves behind keep its stdout
            r = subprocess.run([RAY, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=180)
        assert r.returncode == 0, f"ray {args[0]} {args[1]} failed:\n{self.log.read_text()[-3000:]}"

    def start(self) -> None:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":  # `ray start` refuses token mode without a token
            subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, stdout=subprocess.DEVNULL, check=True, timeout=60)
        p = GCS_PORT
        self._ray("start", "--head", "--port", str(p), "--ray-client-server-port", str(p + 3), "--include-dashboard", "false",
                  "--dashboard-port", str(p + 8), *self._node_args("head"))
        self._ray("start", "--address", f"127.0.0.1:{p}", *self._node_args("worker"))

    def stop_worker(self) -> float:
        return _stop([(str(self.root / "worker"),)], grace_s=20)

    def stop_all(self) -> None:
        _stop([(str(self.root),), ("ray.util.client.server", f"--port={GCS_PORT + 3}")], grace_s=5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    nodes = TwoNodes()
    try:
        nodes.start()
        ray.init(address=f"127.0.0.1:{GCS_PORT}", log_to_driver=False)  # attaches to the head's raylet (same host)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        yield nodes
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            nodes.stop_all()


def _node_ids() -> dict[str, str]:
    """{"head": node id, "worker": node id} of the live nodes, by their label."""
    return {n["Labels"][LABEL]: n["NodeID"] for n in ray.nodes() if n["Alive"] and LABEL in n.get("Labels", {})}


def _placement(app: str) -> dict[str, list[tuple[str, str | None]]]:
    """Each deployment's replicas as (state, node id)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return {name: [(r["state"], r.get("node_id")) for r in d["replicas"]] for name, d in details.items()}


def _ask(c: openai.OpenAI, question: str, mode: str | None = None, timeout: float = 60):
    extra = {"kvswitch": {"mode": mode}} if mode else None
    r = c.with_options(timeout=timeout).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                                extra_body=extra)
    return r.choices[0].message.content, r.model_extra["kvswitch"]["route"]


def _stream_events(base: str, started: threading.Event, out: dict) -> None:
    """A long slow reply, streamed; records every SSE data line."""
    body = {"model": MODEL, "stream": True, "max_tokens": 768, "kvswitch": {"mode": "slow"}, "messages": [{"role": "user", "content": LONG}]}
    events = out.setdefault("events", [])
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        started.set()
    except Exception as exc:  # noqa: BLE001 — recorded, judged by the test
        out["exception"] = repr(exc)
    finally:
        started.set()


@pytest.mark.cluster
def test_two_nodes_pin_serve_and_survive_losing_the_worker(two_nodes):
    timings: dict[str, float] = {}
    nodes = _node_ids()
    assert set(nodes) == {"head", "worker"} and nodes["head"] != nodes["worker"]
    assert ray.get_runtime_context().get_node_id() == nodes["head"]  # the driver sits on the head

    # the cluster config's pins, this test's sizes (2 CPUs per node here)
    pins = {n: {k: v for k, v in _args(_serve_config())[n].items() if k in PIN_KEYS} for n in DEPLOYMENTS}
    size = {"num_cpus": 0.25, "max_ongoing_requests": 64, "max_queued_requests": 128}
    args = {"auth": _args(_serve_config())["auth"], "router": {"num_cpus": 0.1, **pins["router"]},
            "prefill": {"num_cpus": 0.25, **pins["prefill"]}, "fast": {**size, **pins["fast"]}, "slow": {**size, **pins["slow"]}}
    t0 = time.monotonic()
    from serve_app.app import build_app

    serve.run(build_app(args), name="kvswitch", route_prefix="/")
    timings["deploy_s"] = time.monotonic() - t0
    placed = _placement("kvswitch")
    for name in ("router", "prefill", "fast"):
        assert placed[name] == [("RUNNING", nodes["head"])], (name, placed)
    assert placed["slow"] == [("RUNNING", nodes["worker"])], placed  # fast and slow on different nodes

    base = f"http://127.0.0.1:{HTTP_PORT}"
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401  # the keys reached the router through `ray start`'s environment
    content, route = _ask(c, EASY)
    assert is_correct(content, "5") and route == "fast"
    content, route = _ask(c, HARD, "slow")
    assert is_correct(content, "-11") and route == "slow"
    content, route = _ask(c, HARD)
    assert is_correct(content, "-11") and route == "slow"

    # a slow reply is streaming from the worker when the worker node stops
    streamed: dict = {}
    started = threading.Event()
    streamer = threading.Thread(target=_stream_events, args=(base, started, streamed), daemon=True)
    streamer.start()
    assert started.wait(60), streamed
    t_stop = time.monotonic()
    timings["worker_processes_exit_s"] = two_nodes.stop_worker()

    # a forced-slow request sent while the slow pool has no replica: it waits for the new one
    waiting: dict = {}

    def wait_for_slow():
        try:
            waiting["reply"] = _ask(c, HARD, "slow", timeout=RECOVERY_LIMIT_S + 60)
        except Exception as exc:  # noqa: BLE001
            waiting["exception"] = repr(exc)
        waiting["at_s"] = time.monotonic() - t_stop

    waiter = threading.Thread(target=wait_for_slow, daemon=True)
    waiter.start()
    t_easy = time.monotonic()
    content, route = _ask(c, EASY)  # the fast pool, on the head, never noticed
    assert is_correct(content, "5") and route == "fast"
    timings["easy_during_outage_s"] = time.monotonic() - t_easy

    deadline, placed = t_stop + RECOVERY_LIMIT_S, {}
    while time.monotonic() < deadline:
        if "worker_dead_s" not in timings and "worker" not in _node_ids():
            timings["worker_dead_s"] = time.monotonic() - t_stop
        placed = _placement("kvswitch")
        if "replacement_s" not in timings and any(node != nodes["worker"] for _, node in placed["slow"]):
            timings["replacement_s"] = time.monotonic() - t_stop  # the controller noticed and started a new replica
        if placed["slow"] == [("RUNNING", nodes["head"])] and serve.status().applications["kvswitch"].status == "RUNNING":
            break
        time.sleep(0.25)
    timings["slow_running_on_head_s"] = time.monotonic() - t_stop
    assert placed["slow"] == [("RUNNING", nodes["head"])], f"slow pool not back on the head after {RECOVERY_LIMIT_S} s: {placed}"
    assert "worker" not in _node_ids()

    content, route = _ask(c, HARD, "slow")
    assert is_correct(content, "-11") and route == "slow"
    content, route = _ask(c, HARD)
    assert is_correct(content, "-11") and route == "slow"
    assert {n: p for n, p in _placement("kvswitch").items() if n != "slow"} == \
           {n: [("RUNNING", nodes["head"])] for n in ("router", "load_board", "prefill", "fast")}  # nothing else moved

    waiter.join(RECOVERY_LIMIT_S + 90)
    assert "reply" in waiting and is_correct(waiting["reply"][0], "-11") and waiting["reply"][1] == "slow", waiting
    timings["request_sent_during_outage_answered_s"] = waiting["at_s"]
    streamer.join(120)
    events = streamed["events"]
    assert streamed.get("status") == 200 and "exception" not in streamed, streamed
    # the interrupted stream ends with [DONE] (it finished first) or with an explicit error event, never silently
    assert events[-1] == "[DONE]" or json.loads(events[-1])["error"]["code"] == "replica_failed", events[-3:]
    print(f"\ncluster failover timings: { {k: round(v, 1) for k, v in timings.items()} }; "
          f"interrupted stream ended with {'[DONE]' if events[-1] == '[DONE]' else 'a replica_failed error event'}")
