"""Building an engine from the config: local files only (never the hub), probe checked against the model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from serve_app.config import AppConfig
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.engines.base import Engine, checkpoint_dtype


def load_model(path: str | Path, dtype: str = "auto"):
    """Model and tokenizer from a local directory (never the hub), eval mode, in ``dtype``
    (``checkpoint_dtype``; default the checkpoint's)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: expected a directory with config.json (train one with `kvswitch train-model`)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    checkpoint_dtype(None, dtype)  # refuses an unknown name before loading
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model.eval()
    return model, tokenizer


def online_config(cfg: AppConfig, probe: Probe) -> OnlineConfig:
    """The probe's calibrated switching thresholds with the config's overrides on top."""
    return probe.online_config(cfg.online.model_dump(exclude={"enabled"}))


def routing_limits(cfg: AppConfig, probe: Probe, model_config) -> tuple[float, int]:
    """The router's τ (``policy.tau``, else the switching τ) and context length: the config's, else
    the model's, and never more than a vLLM pool's ``max_model_len`` (vLLM would cut the reply there)."""
    tau = cfg.policy.tau if cfg.policy.tau is not None else online_config(cfg, probe).tau
    context = cfg.context_length or int(getattr(model_config, "max_position_embeddings", 4096))
    engine_lens = [int(pc.vllm["max_model_len"]) for pc in map(cfg.engine_settings, ("prefill", "fast", "slow"))
                   if pc.engine == "vllm" and pc.vllm.get("max_model_len")]
    return tau, min([context, *engine_lens])


def make_engine(cfg: AppConfig, pool: str) -> Engine:
    """The engine of one pool (``prefill``, ``fast`` or ``slow``) as its ``engine`` setting asks:
    ``hf``, a ``ContinuousBatcher`` over an ``HFEngine``; ``vllm``, a ``VLLMEngine`` with the pool's
    ``vllm`` AsyncEngineArgs overrides. Either way the probe must match the model."""
    pc = cfg.engine_settings(pool)
    torch.set_num_threads(cfg.torch_threads)
    if pc.engine == "vllm":
        from serve_app.engines.vllm_engine import VLLMEngine

        config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        probe = Probe.load(cfg.probe, config)
        overrides = {"dtype": checkpoint_dtype(config, cfg.dtype), **pc.vllm}  # a pool's vllm.dtype wins
        return VLLMEngine.create(cfg.model, probe, online_config(cfg, probe), prompts=cfg.think_tags, **overrides)
    from serve_app.engines.batcher import ContinuousBatcher
    from serve_app.engines.hf import HFEngine

    model, tokenizer = load_model(cfg.model, cfg.dtype)
    probe = Probe.load(cfg.probe, model.config)
    return ContinuousBatcher(HFEngine(model, tokenizer, cfg.think_tags), probe, online_config(cfg, probe), getattr(pc, "max_batch_size", 16))
