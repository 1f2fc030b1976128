"""Training the probe's regressor heads, and the random-vector baseline feature (calibration only)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from serve_app.core.probe import MLPRegressor


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
