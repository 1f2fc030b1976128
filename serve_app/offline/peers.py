"""The peer policies of ``kvswitch eval`` (issue 21): what a user would run instead of kvswitch.

* ``budget:B`` — slow mode with the thought capped at B tokens, then ``</think>`` forced (vLLM's
  ``thinking_token_budget``; ``GenRequest.max_thinking_tokens``).
* ``dynasor[:K[,W]]`` — Dynasor-CoT answer consistency, ``deer[:LAMBDA]`` — DEER trial-answer
  confidence (``serve_app.core.early_exit``; side branches on the HF engine).
* ``length-oneshot[:L]`` — fast when the prompt has at most L tokens, else slow; without L, the
  threshold ``calibrate`` fitted on its training split (stored in the probe).

``budget``, ``dynasor`` and ``deer`` run through the engine from slow mode; ``length-oneshot`` only
chooses between each question's fast and slow reply, as ``oracle`` and ``random`` do.
"""

from __future__ import annotations

from serve_app.core.early_exit import EXIT_KINDS, parse_exit

ENGINE_PEERS = ("budget", *EXIT_KINDS)
CHOICE_PEERS = ("length-oneshot",)


def family(policy: str) -> str:
    """``dynasor:32,3`` → ``dynasor``."""
    return policy.partition(":")[0]


def is_peer(policy: str) -> bool:
    return family(policy) in ENGINE_PEERS + CHOICE_PEERS


def is_engine_peer(policy: str) -> bool:
    return family(policy) in ENGINE_PEERS


def check(policy: str) -> str:
    """``policy`` if it is a well-formed peer policy name, else a ``ValueError`` that says how to write it."""
    kind, _, arg = policy.partition(":")
    if kind in EXIT_KINDS:
        parse_exit(policy)
    elif kind == "budget":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"bad policy {policy!r}: write budget:B with B >= 1 thinking tokens")
    elif kind == "length-oneshot":
        if arg and not arg.isdigit():
            raise ValueError(f"bad policy {policy!r}: write length-oneshot or length-oneshot:L with L prompt tokens")
    else:
        raise ValueError(f"{policy!r} is not a peer policy")
    return policy


def request_options(policy: str, max_thinking_tokens: int | None) -> dict:
    """The ``GenRequest`` options of an engine peer (it starts in slow mode)."""
    kind, _, arg = policy.partition(":")
    if kind == "budget":
        cap = int(arg) if max_thinking_tokens is None else min(int(arg), max_thinking_tokens)
        return {"mode": "slow", "max_thinking_tokens": cap}
    return {"mode": "slow", "max_thinking_tokens": max_thinking_tokens, "early_exit": parse_exit(policy)}


def length_threshold(policy: str, probe) -> int:
    """L of ``length-oneshot:L``, else the one the probe's calibration fitted."""
    _, _, arg = policy.partition(":")
    if arg:
        return int(arg)
    fitted = None if probe is None else probe.data.get("length_threshold")
    if fitted is None:
        raise ValueError("length-oneshot without L needs a probe calibrated by this version of `kvswitch calibrate` "
                         "(it fits L on its training split); or give the threshold: length-oneshot:L")
    return int(fitted)


def probe_summary(records: list[dict]) -> dict | None:
    """Side-branch tokens and exits of an early-exit policy's records (None for other policies)."""
    if not any("probe_tokens" in r for r in records):
        return None
    n = len(records)
    probe = sum(r.get("probe_tokens", 0) for r in records)
    return {
        "mean_probe_tokens": probe / n,
        "mean_tokens_with_probes": (sum(r["tokens"] for r in records) + probe) / n,
        "exits": sum(r.get("exited_at") is not None for r in records),
    }
