"""AppConfig validates serve_config.yaml's args; build_app wires the graph from it."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import build_app
from serve_app.config import AppConfig
from serve_app.core.probe import ProbeMismatchError

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_yaml_is_a_valid_app_config():
    spec = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = spec["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.slow.autoscaling_config["max_replicas"] == 2 and cfg.slow.num_replicas is None
    # saturation defaults to the point where Ray would start refusing slow requests:
    # running capacity at min replicas (1) plus the handle's queue
    assert cfg.policy.slow_saturation_requests == cfg.slow.max_ongoing_requests * 1 + cfg.slow.max_queued_requests
    for dep in (cfg.router, cfg.prefill, cfg.fast, cfg.slow):
        assert dep.options()["max_ongoing_requests"] == dep.max_ongoing_requests  # never Ray's default of 5
    assert build_app(app["args"]) is not None


def test_default_saturation_is_where_the_slow_pool_would_refuse(model_dir):
    from serve_app.config import PoolConfig, default_slow_saturation

    assert default_slow_saturation(PoolConfig(num_replicas=2, max_ongoing_requests=8, max_queued_requests=10)) == 2 * 8 + 10
    auto = PoolConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 3}, max_ongoing_requests=8, max_queued_requests=10)
    assert default_slow_saturation(auto) == 8 + 10  # only the replicas it can count on
    assert default_slow_saturation(PoolConfig(num_replicas=2, max_ongoing_requests=8, max_queued_requests=-1)) == 16  # unbounded queue
    explicit = AppConfig(model=str(model_dir), policy={"slow_saturation_requests": 5})
    assert explicit.policy.slow_saturation_requests == 5


@pytest.mark.parametrize("args,match", [
    ({"modle": "x"}, "modle"),
    ({"model": "/nonexistent/model"}, "no model at"),
    ({"probe": "/nonexistent/probe.pt"}, "no probe at"),
    ({"fast": {"max_tokens": 0}}, "max_tokens"),
    ({"policy": {"slow_tokens_min": 500, "slow_tokens_max": 100}}, "slow_tokens_max"),
])
def test_bad_config_is_refused_with_a_clear_message(args, match):
    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate(args)


def test_a_probe_of_another_model_is_refused_before_any_replica_starts(tmp_path, model_dir):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg_text = (other / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    (other / "config.json").write_text(cfg_text)
    with pytest.raises(ProbeMismatchError):
        build_app({"model": str(other)})


@pytest.mark.parametrize("path", ["serve_config.vllm.yaml", "cluster/serve_config.gpu.yaml"])
def test_vllm_serve_configs_are_valid_app_configs(path, model_dir):
    args = yaml.safe_load((ROOT / path).read_text())["applications"][0]["args"]
    cfg = AppConfig.model_validate({**args, "model": str(model_dir)})  # the GPU example names a checkpoint this machine lacks
    assert cfg.prefill.engine == cfg.fast.engine == cfg.slow.engine == "vllm"
    assert cfg.slow.vllm["gpu_memory_utilization"] <= 0.85


def test_the_router_context_is_never_longer_than_a_vllm_pools(model_dir):
    """The embedded model has 2048 positions; a vLLM pool started with max_model_len 1024 would cut a
    reply at 1024, so the router must admit and budget requests against 1024."""
    from transformers import AutoConfig

    from serve_app.core.probe import Probe
    from serve_app.engines.load import routing_limits

    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    probe = Probe.load(model_dir / "probe.pt", model_config)
    assert model_config.max_position_embeddings == 2048
    assert routing_limits(AppConfig(model=str(model_dir)), probe, model_config)[1] == 2048
    small = AppConfig(model=str(model_dir), slow={"engine": "vllm", "vllm": {"max_model_len": 1024}})
    assert routing_limits(small, probe, model_config)[1] == 1024
    assert routing_limits(AppConfig(model=str(model_dir), context_length=512), probe, model_config)[1] == 512
