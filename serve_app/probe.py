"""Difficulty probe (DESIGN §2): labels, the MLP regressor, and a checkpoint that knows its model.

Labels (0–100, per calibration question, after running both modes):
  0 = fast correct and short, 25 = fast correct but long, 75 = fast wrong and slow correct,
  100 = both wrong. "Short" is ``LabelConfig.short_tokens`` (128 on real models; scaled to the
  model at calibration and recorded in the checkpoint).

A checkpoint holds one regressor head per feature kind (``kv`` for one-step routing, ``kv-decode``
for online switching, and the baselines ``hidden``, ``minilm``, ``random``) plus everything needed
to reproduce its input: pooling settings, label settings, thresholds, and the fingerprint of the
model it was calibrated on. Loading it against a different model raises ``ProbeMismatchError``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from serve_app.kv_features import PoolingConfig

FORMAT = "kvswitch-probe/1"


class ProbeMismatchError(ValueError):
    """The probe was calibrated on a different model than the one it is asked to serve."""


class LabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    short_tokens: int = Field(128, ge=1, description="fast replies under this many tokens are 'short'")
    fast_short: float = 0.0
    fast_long: float = 25.0
    slow_only: float = 75.0
    both_wrong: float = 100.0


def difficulty_label(fast_correct: bool, fast_tokens: int, slow_correct: bool, cfg: LabelConfig) -> float:
    if fast_correct:
        return cfg.fast_short if fast_tokens < cfg.short_tokens else cfg.fast_long
    return cfg.slow_only if slow_correct else cfg.both_wrong


def model_fingerprint(config: Any) -> str:
    """sha256 of the model's architecture config (a transformers PretrainedConfig or a dict),
    without bookkeeping fields (paths, library version, dtype) that do not change the model."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "torch_dtype", "dtype", "architectures", "use_cache", "output_hidden_states"}
    clean = {k: v for k, v in d.items() if not k.startswith("_") and k not in drop}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


class MLPRegressor(torch.nn.Module):
    """in → hidden → ReLU → 1 on standardised features (DESIGN §2: 2048 → 512 → ReLU → 1)."""

    def __init__(self, in_dim: int, hidden: int = 512):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        self.in_dim, self.hidden = in_dim, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)


class TrainProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(512, ge=1)
    epochs: int = Field(300, ge=1)
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = Field(256, ge=1)
    patience: int = Field(40, ge=1, description="stop after this many epochs without a better early-stop loss")
    seed: int = 0


def train_regressor(
    x_train: torch.Tensor, y_train: torch.Tensor, x_stop: torch.Tensor, y_stop: torch.Tensor, cfg: TrainProbeConfig
) -> tuple[MLPRegressor, dict]:
    """MSE regression with early stopping on ``(x_stop, y_stop)`` — a split of the *training*
    questions; the reported validation split is never seen here."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = MLPRegressor(x_train.shape[1], cfg.hidden)
    model.mean.copy_(x_train.float().mean(0))
    model.std.copy_(x_train.float().std(0).clamp(min=1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, since, epochs = float("inf"), None, 0, 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = torch.nn.functional.mse_loss(model(x_train[idx]), y_train[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            stop_loss = torch.nn.functional.mse_loss(model(x_stop), y_stop.float()).item()
        epochs = epoch + 1
        if stop_loss < best - 1e-6:
            best, since = stop_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"epochs": epochs, "early_stop_mse": best}


class Probe:
    """A calibrated probe bound to one model. Implements the engine's ``DifficultyScorer``."""

    def __init__(self, data: dict):
        if data.get("format") != FORMAT:
            raise ValueError(f"not a kvswitch probe checkpoint (format {data.get('format')!r}, expected {FORMAT!r})")
        self.data = data
        self.pooling = PoolingConfig(**data["pooling"])
        self.decode_pooling = PoolingConfig(**data.get("decode_pooling", data["pooling"]))
        self.labels = LabelConfig(**data["labels"])
        self.thresholds: dict = data["thresholds"]
        self.fingerprint: str = data["model_fingerprint"]
        self.heads: dict[str, MLPRegressor] = {}
        for kind, head in data["heads"].items():
            reg = MLPRegressor(head["in_dim"], head["hidden"])
            reg.load_state_dict(head["state_dict"])
            reg.eval()
            self.heads[kind] = reg

    # -- the engine's interface ------------------------------------------------------------
    def predict(self, kind: str, features: torch.Tensor) -> torch.Tensor:
        if kind not in self.heads:
            raise KeyError(f"probe has no {kind!r} head (has {sorted(self.heads)})")
        with torch.no_grad():
            return self.heads[kind](features).clamp(0.0, 100.0)

    def prompt_difficulty(self, features: torch.Tensor, kind: str = "kv") -> torch.Tensor:
        """Difficulty of prompts from their prefill feature of the given kind (``kv`` or ``hidden``)."""
        return self.predict(kind, features)

    def decode_difficulty(self, features: torch.Tensor) -> torch.Tensor:
        """Online re-scoring uses the head calibrated on mid-generation states when present,
        else the prompt head (the paper's behaviour)."""
        return self.predict("kv-decode" if "kv-decode" in self.heads else "kv", features)

    # -- persistence -----------------------------------------------------------------------
    def check_model(self, config: Any) -> None:
        got = model_fingerprint(config)
        if got != self.fingerprint:
            raise ProbeMismatchError(
                f"probe was calibrated on model {self.data.get('model_name', '?')} (fingerprint {self.fingerprint[:12]}), "
                f"but the serving model has fingerprint {got[:12]}; recalibrate with `kvswitch calibrate --model ...`"
            )

    @classmethod
    def load(cls, path: str | Path, model_config: Any | None = None) -> "Probe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no probe at {path}: run `kvswitch calibrate --model M --dataset D --out {path}`")
        probe = cls(torch.load(path, map_location="cpu", weights_only=True))
        if model_config is not None:
            probe.check_model(model_config)
        return probe

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.data, path)

    @property
    def confidence(self):
        from serve_app.coe import ConfidenceCalibration

        conf = self.data.get("confidence")
        return None if conf is None else {mode: ConfidenceCalibration.from_dict(c) for mode, c in conf.items()}


def head_record(reg: MLPRegressor, kind: str, metrics: dict) -> dict:
    return {
        "kind": kind,
        "in_dim": reg.in_dim,
        "hidden": reg.hidden,
        "state_dict": {k: v.detach().clone() for k, v in reg.state_dict().items()},
        "metrics": metrics,
    }


def random_features(texts: list[str], dim: int, seed: int = 0) -> torch.Tensor:
    """The random-vector baseline: a fixed Gaussian vector per distinct text (no information)."""
    out = np.empty((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        h = int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest()[:8], "little")
        out[i] = np.random.default_rng(h).standard_normal(dim)
    return torch.from_numpy(out)
