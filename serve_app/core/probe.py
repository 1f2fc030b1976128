"""Difficulty probe (docs/method.md §3): labels, the MLP regressor, and a checkpoint that knows its model.

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

import torch
from pydantic import BaseModel, ConfigDict, Field

from serve_app.core.confidence import ConfidenceCalibration
from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import TOKEN_MAP_FIELDS, OnlineConfig

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
    """in → hidden → ReLU → 1 on standardised features (docs/method.md §3: 2048 → 512 → ReLU → 1)."""

    def __init__(self, in_dim: int, hidden: int = 512):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        self.in_dim, self.hidden = in_dim, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)


class Probe:
    """A calibrated probe bound to one model. Implements the engine's ``DifficultyScorer``."""

    def __init__(self, data: dict):
        if data.get("format") != FORMAT:
            raise ValueError(f"not a kvswitch probe checkpoint (format {data.get('format')!r}, expected {FORMAT!r})")
        self.data = data
        self.path: Path | None = None
        """The checkpoint this probe was loaded from (engines that run it in another process load it there)."""
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
        probe.path = path
        if model_config is not None:
            probe.check_model(model_config)
        return probe

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.data, path)

    def online_config(self, overrides: dict[str, Any] | None = None) -> OnlineConfig:
        """The calibrated switching thresholds, with every override that is not None on top."""
        thresholds = dict(self.thresholds)
        thresholds.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return OnlineConfig(**thresholds)

    @property
    def grader(self) -> str:
        """The grader the probe's labels were graded with (``serve_app.core.grading``); checkpoints
        from before graders were recorded were all graded by ``number``."""
        return (self.data.get("calibration") or {}).get("grader", "number")

    @property
    def token_map(self) -> dict[str, float] | None:
        """The ``expected_tokens`` map fitted for this probe's model on a dev set (``kvswitch
        set-thresholds --token-map-from``), or None: serving then keeps ``PolicyConfig``'s defaults."""
        fitted = self.data.get("token_map")
        return None if fitted is None else {k: float(fitted[k]) for k in TOKEN_MAP_FIELDS}

    @property
    def confidence(self) -> dict[str, ConfidenceCalibration] | None:
        conf = self.data.get("confidence")
        return None if conf is None else {mode: ConfidenceCalibration.from_dict(c) for mode, c in conf.items()}
