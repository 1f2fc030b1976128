"""Experiment setup, once for every offline tool (calibrate, eval, quant-report, best-of-N): the
model and its HF engine from local files, the dataset's rows and their prompts, and batched
generation with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from serve_app.core.probe import Probe
from serve_app.core.task import read_jsonl
from serve_app.engines.base import GenRequest, GenResult
from serve_app.engines.hf import HFEngine
from serve_app.engines.load import load_model


def run_batched(engine: HFEngine, requests: list[GenRequest], batch_size: int, desc: str, **kwargs) -> list[GenResult]:
    """Generate in length-sorted batches (less padding) and return results in request order;
    ``kwargs`` are ``HFEngine.generate``'s batch options."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
    out: list[GenResult | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="q") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, res in zip(idx, engine.generate([requests[i] for i in idx], **kwargs)):
                out[i] = res
            bar.update(len(idx))
    return out  # type: ignore[return-value]


@dataclass
class Experiment:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: HFEngine
    rows: list[dict]
    """The dataset's rows (``question``, ``answer``), at most ``limit`` of them."""
    prompt_ids: list[list[int]]
    """Each question as the shared prompt every request prefills."""

    def requests(self, **options) -> list[GenRequest]:
        """One ``GenRequest`` per question, all with the same ``options``."""
        return [GenRequest(prompt_ids=p, **options) for p in self.prompt_ids]

    def run(self, requests: list[GenRequest], batch_size: int, desc: str, **kwargs) -> list[GenResult]:
        return run_batched(self.engine, requests, batch_size, desc, **kwargs)

    def probe(self, path: str | Path) -> Probe:
        """A probe checkpoint, refused when it was calibrated on another model."""
        return Probe.load(path, self.model.config)


def setup(model: str | Path, dataset: str | Path, limit: int | None = None, min_rows: int = 1) -> Experiment:
    """Load the model (never from the hub) and the first ``limit`` rows of ``dataset`` (at least ``min_rows``)."""
    m, tokenizer = load_model(model)
    engine = HFEngine(m, tokenizer)
    rows = list(read_jsonl(dataset))[:limit]
    if len(rows) < min_rows:
        need = "holds no questions" if min_rows == 1 else f"needs at least {min_rows} questions, got {len(rows)}"
        raise ValueError(f"{dataset} {need}")
    return Experiment(m, tokenizer, engine, rows, [engine.encode_prompt(r["question"]) for r in rows])
