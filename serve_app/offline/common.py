"""Experiment setup, once for every offline tool (calibrate, eval, quant-report, best-of-N): the
model and its engine from local files, the dataset's rows and their prompts, and generation with a
progress bar.

Two engines: ``hf`` (the default; ``HFEngine.generate`` in length-sorted batches) and ``vllm``
(``VLLMEngine`` on its own event loop; every request is submitted at once under a semaphore of
``batch_size`` and vLLM batches them itself). ``Experiment.run`` / ``Experiment.features`` take
the HF engine's batch options on both; the vLLM engine's connector settings (probe, switching
thresholds, poolings) are fixed when it starts, so the experiment starts it on first use with what
the call asks for and restarts it only when a later call asks for other settings."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self

import torch
from tqdm import tqdm

from serve_app.core.datasets import read_dataset
from serve_app.core.grading import check_references, get_grader
from serve_app.core.kv_features import PoolingConfig
from serve_app.core.policy import OnlineConfig
from serve_app.core.probe import Probe
from serve_app.core.prompts import ThinkTags, encode_messages
from serve_app.engines.base import GenRequest, GenResult, TokenSetup
from serve_app.engines.hf import HFEngine
from serve_app.engines.load import checkpoint_dtype, load_model

EngineKind = Literal["hf", "vllm"]
ENGINES = ("hf", "vllm")
VLLM_DEFAULTS: dict[str, Any] = {"gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 256 << 20}
"""AsyncEngineArgs for the offline tools on a small CPU machine (what ``bench-engines`` uses)."""


def batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into length-sorted batches (less padding) of at most ``batch_size`` rows and,
    with ``max_batch_tokens``, at most that many padded positions (rows x the longest row's length:
    the KV cache a padded batch holds at its end). A row longer than the bound goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        batch = out[-1] if out else None
        fits = batch is not None and len(batch) < batch_size and (
            max_batch_tokens is None or (len(batch) + 1) * max(lengths[i], lengths[batch[-1]]) <= max_batch_tokens)
        if fits:
            batch.append(i)
        else:
            out.append([i])
    return out


def run_batched(engine: HFEngine, requests: list[GenRequest], batch_size: int, desc: str, max_batch_tokens: int | None = None,
                **kwargs) -> list[GenResult]:
    """Generate in length-sorted batches (``batches``: at most ``batch_size`` rows and
    ``max_batch_tokens`` positions of prompt + prefix + reply) and return results in request order;
    ``kwargs`` are ``HFEngine.generate``'s batch options."""
    prefix = lambda r: 0 if not r.add_prefix else len(engine.prefix_ids[r.mode]) if r.mode else max(map(len, engine.prefix_ids.values()))  # noqa: E731
    lengths = [len(r.prompt_ids) + prefix(r) + r.max_new_tokens for r in requests]
    out: list[GenResult | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="q") as bar:
        for idx in batches(lengths, batch_size, max_batch_tokens):
            for i, res in zip(idx, engine.generate([requests[i] for i in idx], **kwargs)):
                out[i] = res
            bar.update(len(idx))
    return out  # type: ignore[return-value]


@dataclass
class Experiment:
    model: Any
    """The HF model (``PreTrainedModel``); None on the vLLM engine (the model lives in vLLM)."""
    tokenizer: Any
    engine: Any
    """The ``HFEngine``; on vLLM the running ``VLLMEngine`` (None until the first run starts it)."""
    rows: list[dict]
    """The dataset's rows (``question``, ``answer``), at most ``limit`` of them."""
    prompt_ids: list[list[int]]
    """Each question as the shared prompt every request prefills."""
    engine_kind: EngineKind = "hf"
    model_config: Any = None
    """The model's ``PretrainedConfig`` (probe checks, fingerprints), on either engine."""
    model_path: str = ""
    vllm_args: dict[str, Any] = field(default_factory=dict)
    """``AsyncEngineArgs`` overrides of the vLLM engine (dtype, max_model_len, ...)."""
    max_batch_tokens: int | None = None
    """HF engine: at most this many padded positions per batch (the KV cache's bound); None: ``batch_size`` only."""
    _loop: asyncio.AbstractEventLoop | None = None
    _vllm_settings: dict[str, Any] = field(default_factory=dict)
    _tokens: TokenSetup | None = None

    def __post_init__(self):
        if self.model_config is None and self.model is not None:
            self.model_config = self.model.config

    @property
    def tokens(self) -> TokenSetup:
        """Mode prefixes, switch ids and mode prompts of the tokenizer (the same on both engines)."""
        if isinstance(self.engine, TokenSetup):
            return self.engine
        if self._tokens is None:
            self._tokens = TokenSetup(self.tokenizer)
        return self._tokens

    def requests(self, **options) -> list[GenRequest]:
        """One ``GenRequest`` per question, all with the same ``options``."""
        return [GenRequest(prompt_ids=p, **options) for p in self.prompt_ids]

    def run(self, requests: list[GenRequest], batch_size: int, desc: str, **kwargs) -> list[GenResult]:
        """Generate every request; results in request order. ``kwargs`` are ``HFEngine.generate``'s
        batch options (probe, online, prompt_feature, collect_hidden, keep_features, record,
        kv_quant), on either engine; see ``_run_vllm`` for what the vLLM engine does with them."""
        if self.engine_kind == "hf":
            return run_batched(self.engine, requests, batch_size, desc, self.max_batch_tokens, **kwargs)
        return self._run_vllm(requests, batch_size, desc, **kwargs)

    def features(self, pooling: PoolingConfig, batch_size: int, hidden: bool = False, kv_quant=None,
                 desc: str = "prefill features") -> dict[str, torch.Tensor]:
        """The probe feature (``kv``) of every prompt, pooled with ``pooling``, and with ``hidden``
        the hidden-state feature (HF engine only); ``kv_quant``: of the simulated quantized cache (HF only)."""
        if self.engine_kind == "hf":
            feats: dict[str, list[torch.Tensor]] = {"kv": [], **({"hidden": []} if hidden else {})}
            groups = batches([len(p) for p in self.prompt_ids], batch_size, self.max_batch_tokens)
            for idx in tqdm(groups, desc=desc, unit="batch"):
                f = self.engine.prompt_features([self.prompt_ids[i] for i in idx], pooling, hidden=hidden, kv_quant=kv_quant, embedding=False)
                for k, acc in feats.items():
                    acc.append(f[k])
            order = torch.tensor([i for idx in groups for i in idx]).argsort()  # back to question order
            return {k: torch.cat(v)[order] for k, v in feats.items()}
        if hidden:
            raise ValueError("the vLLM engine has no hidden-state features (vLLM keeps no hidden states); use the HF engine")
        _refuse_kv_quant(kv_quant)
        eng = self._vllm(pooling=pooling)
        kv = self._call(gather_bounded([eng.prompt_features(p) for p in self.prompt_ids], batch_size, desc))
        return {"kv": torch.stack([f["kv"] for f in kv]).float()}

    def describe(self, engine: str, dtype: str) -> tuple[str, str]:
        """The engine and the resolved dtype the replies came from, for reports and probes."""
        return engine, checkpoint_dtype(self.model_config, dtype)

    def probe(self, path: str | Path) -> Probe:
        """A probe checkpoint, refused when it was calibrated on another model."""
        return Probe.load(path, self.model_config)

    # ------------------------------------------------------------------------------ vLLM

    def prepare(self, probe: Probe | None = None, online: OnlineConfig | None = None, pooling: PoolingConfig | None = None,
                decode_pooling: PoolingConfig | None = None) -> None:
        """Start the vLLM engine now with these connector settings (later calls that ask for the same
        settings reuse it); nothing on the HF engine, which takes them per batch."""
        if self.engine_kind == "vllm":
            self._vllm(probe=probe, online=online, pooling=pooling, decode_pooling=decode_pooling)

    def close(self) -> None:
        """Shut the vLLM engine down and close its event loop (nothing on the HF engine)."""
        self._stop_vllm()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stop_vllm(self) -> None:
        """Shut the running vLLM engine down, let its output tasks end on the loop, and collect it
        now (AsyncLLM sits in reference cycles; its ``__del__`` at interpreter exit fails)."""
        if self.engine is None or self.engine_kind != "vllm":
            return
        llm, self.engine = self.engine.llm, None
        llm.shutdown()
        del llm

        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(drain())
        gc.collect()

    def _call(self, coro):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def _vllm(self, **want):
        """The running vLLM engine with at least the settings in ``want`` (None = any); a new one
        when the running one was started with other settings."""
        settings = {**self._vllm_settings, **{k: v for k, v in want.items() if v is not None}}
        if self.engine is not None and settings == self._vllm_settings:
            return self.engine
        if self.engine is not None:
            print("restarting the vLLM engine with other connector settings")
            self._stop_vllm()
        from serve_app.engines.vllm_engine import VLLMEngine

        online = settings.get("online") or OnlineConfig()

        async def create():  # vLLM's AsyncLLM must start inside a running loop
            return VLLMEngine.create(self.model_path, settings.get("probe"), online, coe=True, pooling=settings.get("pooling"),
                                     decode_pooling=settings.get("decode_pooling"), prompts=self.tokens.prompts, **self.vllm_args)

        self.engine = self._call(create())
        self._vllm_settings = settings
        return self.engine

    def _run_vllm(self, requests: list[GenRequest], batch_size: int, desc: str, probe: Probe | None = None,
                  online: OnlineConfig | None = None, record: tuple[PoolingConfig, int] | None = None, kv_quant=None,
                  prompt_feature: str = "kv", collect_hidden: bool = False, keep_features: bool = False) -> list[GenResult]:
        """The HF batch options on vLLM: ``probe``/``online`` and ``record``'s pooling become the
        engine's connector settings; requests without a mode are routed as the HF engine routes them
        (probe difficulty of the prompt's KV feature, ``d > tau`` → slow), the feature from one
        prefill of the prompt (prefix caching reuses it for the reply); ``keep_features`` keeps that
        feature and the KV embedding. Not on vLLM: hidden states (``collect_hidden`` is ignored:
        results carry no hidden feature or trajectory, nor token probabilities) and ``kv_quant``.

        ``record``: the connector records every k counted tokens after the first; the HF engine also
        records at 0 (the cache right after the mode prefix), so that record is the prompt feature of
        prompt + prefix with the engine's prompt pooling set to the record pooling."""
        _refuse_kv_quant(kv_quant)
        if prompt_feature != "kv":
            raise ValueError(f"the vLLM engine routes on the KV feature only; prompt_feature={prompt_feature!r} needs the HF engine")
        if probe is None and any(r.mode is None or r.online for r in requests):
            raise ValueError("requests without a forced mode, or with online switching, need a calibrated probe")
        want: dict[str, Any] = {"online": online}
        if probe is not None:
            want.update(probe=probe, pooling=probe.pooling, decode_pooling=probe.decode_pooling)
        if record is not None:
            if probe is not None and record[0] != probe.pooling:
                raise ValueError("on the vLLM engine, record's pooling must be the probe's prompt pooling")
            want.update(pooling=record[0], decode_pooling=record[0])
        eng = self._vllm(**want)
        every = record[1] if record else None
        tau = (online or eng.online).tau

        async def first_record(req: GenRequest) -> tuple[int, torch.Tensor] | None:
            prefix = eng.prefix_ids[req.mode] if req.add_prefix else []
            if not (every and prefix and req.already == 0):
                return None
            return 0, (await eng.prompt_features(list(req.prompt_ids) + prefix))["kv"].float()

        async def one(req: GenRequest) -> GenResult:
            # with a probe every reply gets its prompt's difficulty, as on the HF engine (prefix caching
            # makes this one-token prefill the reply's prompt too)
            feats = await eng.prompt_features(req.prompt_ids) if keep_features or probe is not None else None
            difficulty = None
            if feats is not None and probe is not None:
                difficulty = float(probe.prompt_difficulty(feats["kv"].float()[None], kind="kv")[0])
            if req.mode is None:
                req = replace(req, mode="slow" if difficulty > tau else "fast")
            first = await first_record(req)
            res = None
            async for _, res in eng.stream(req, record=every):
                pass
            res.difficulty = difficulty
            if first is not None:
                res.recorded = [first, *res.recorded]
            if keep_features:
                res.prompt_feature, res.embedding = feats["kv"].float(), feats["embedding"].float()
            return res

        return self._call(gather_bounded([one(r) for r in requests], batch_size, desc))


async def gather_bounded(coros: list, limit: int, desc: str) -> list:
    """Await ``coros`` with at most ``limit`` in flight, a progress bar, results in order."""
    sem = asyncio.Semaphore(limit)
    with tqdm(total=len(coros), desc=desc, unit="q") as bar:
        async def bounded(c):
            async with sem:
                out = await c
            bar.update(1)
            return out

        return await asyncio.gather(*(bounded(c) for c in coros))


def _refuse_kv_quant(kv_quant) -> None:
    if kv_quant is not None:
        raise ValueError("simulated KV quantization (--kv-quant) runs on the HF engine only; drop --engine vllm or --kv-quant")


def grader_name(given: str | None, probe_path: str | Path | None = None) -> str:
    """The grader an offline tool uses: the one given, else the one the probe at ``probe_path``
    was calibrated with (when there is one), else ``number``."""
    if given is not None:
        return get_grader(given).name
    if probe_path is not None and Path(probe_path).is_file():
        return get_grader(Probe.load(probe_path).grader).name
    return "number"


def read_rows(dataset: str | Path, limit: int | None, min_rows: int, grader: str | None, question_field: str | None,
              answer_field: str | None) -> list[dict]:
    """The first ``limit`` rows of ``dataset`` (at least ``min_rows``); ``grader``: refuse reference
    answers it cannot grade."""
    rows = read_dataset(dataset, question_field, answer_field, limit=limit)
    if len(rows) < min_rows:
        need = "holds no questions" if min_rows == 1 else f"needs at least {min_rows} questions, got {len(rows)}"
        raise ValueError(f"{dataset} {need}")
    if grader is not None:
        check_references(rows, get_grader(grader), f"{dataset}: ")
    return rows


def tokenizer_only(model: str | Path, rows: list[dict], think_tags: ThinkTags | None) -> tuple[Any, Any, TokenSetup, list[list[int]]]:
    """The checkpoint's tokenizer, config, mode prompts and each row's prompt ids, without its weights
    (the vLLM engine loads them itself; a remote service has them)."""
    from transformers import AutoConfig, AutoTokenizer

    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model}: expected a directory with config.json (train one with `kvswitch train-model`)")
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    tokens = TokenSetup(tokenizer, think_tags)
    prompts = [encode_messages(tokenizer, [{"role": "user", "content": r["question"]}], tokens.prompts) for r in rows]
    return tokenizer, config, tokens, prompts


def setup(model: str | Path, dataset: str | Path, limit: int | None = None, min_rows: int = 1, engine: EngineKind = "hf",
          vllm_args: dict[str, Any] | None = None, dtype: str = "auto", grader: str | None = None,
          question_field: str | None = None, answer_field: str | None = None, think_tags: ThinkTags | None = None,
          max_batch_tokens: int | None = None) -> Experiment:
    """Load the model (never from the hub) and the first ``limit`` rows of ``dataset`` (at least
    ``min_rows``; any format ``read_dataset`` reads, ``question_field`` / ``answer_field`` naming its
    columns). ``grader``: refuse, before loading the model, reference answers it cannot grade.
    ``engine="vllm"``: tokenizer and config only; the vLLM engine (``vllm_args``:
    ``AsyncEngineArgs`` overrides over ``VLLM_DEFAULTS``) starts on first use. ``dtype``: the
    model's dtype on either engine (``auto``: the checkpoint's). ``think_tags``: the tags the mode
    prompts are derived from the chat template with (``resolve_prompts``; default ``<think>``).
    ``max_batch_tokens``: the HF engine's batches hold at most this many padded positions (vLLM
    bounds its own cache: ``gpu_memory_utilization`` / ``kv_cache_memory_bytes`` in ``vllm_args``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    rows = read_rows(dataset, limit, min_rows, grader, question_field, answer_field)
    if engine == "hf":
        m, tokenizer = load_model(model, dtype)
        hf = HFEngine(m, tokenizer, think_tags)
        return Experiment(m, tokenizer, hf, rows, [hf.encode_prompt(r["question"]) for r in rows], model_path=str(model),
                          max_batch_tokens=max_batch_tokens)
    tokenizer, config, tokens, prompts = tokenizer_only(model, rows, think_tags)
    args = {**VLLM_DEFAULTS, "dtype": checkpoint_dtype(config, dtype), **(vllm_args or {})}
    return Experiment(None, tokenizer, None, rows, prompts, engine_kind="vllm", model_config=config, model_path=str(model), vllm_args=args,
                      _tokens=tokens)
