"""The peer policies of ``kvswitch eval`` (issue 21): what a user would run instead of kvswitch.

* ``budget:B`` — slow mode with the thought capped at B tokens, then ``</think>`` forced (vLLM's
  ``thinking_token_budget``; ``GenRequest.max_thinking_tokens``).
* ``dynasor[:K[,W]]`` — Dynasor-CoT answer consistency, ``deer[:LAMBDA]`` — DEER trial-answer
  confidence (``serve_app.core.early_exit``; side branches on the HF engine).
* ``length-oneshot[:L]`` — fast when the prompt has at most L tokens, else slow; without L, the
  threshold ``calibrate`` fitted on its training split (stored in the probe).

``budget``, ``dynasor`` and ``deer`` run through the engine from slow mode; ``length-oneshot`` only
chooses between each question's fast and slow reply, as ``oracle`` and ``random`` do.

kvswitch's own policies take a knob the same way, for knobs chosen on a dev set (``--knobs-from``):
``kv-oneshot:TAU`` (a choice by the prompt difficulty, as ``kv-oneshot`` routes greedy replies) and
``kv-online:DELTA`` (an engine run with that hysteresis and the probe's tau).
"""

from __future__ import annotations

from serve_app.core.early_exit import EXIT_KINDS, parse_exit

ENGINE_PEERS = ("budget", *EXIT_KINDS)
CHOICE_PEERS = ("length-oneshot",)


KNOBBED_KV = ("kv-oneshot", "kv-online")


def family(policy: str) -> str:
    """``dynasor:32,3`` → ``dynasor``."""
    return policy.partition(":")[0]


def is_peer(policy: str) -> bool:
    return family(policy) in ENGINE_PEERS + CHOICE_PEERS


def is_engine_peer(policy: str) -> bool:
    """Runs through the engine with its own request options (``request_options``)."""
    return family(policy) in ENGINE_PEERS or (family(policy) == "kv-online" and ":" in policy)


def is_choice_knob(policy: str) -> bool:
    """Chooses between fast and slow replies by a threshold (``choice``)."""
    return family(policy) == "length-oneshot" or (family(policy) == "kv-oneshot" and ":" in policy)


def is_knobbed(policy: str) -> bool:
    return is_peer(policy) or (family(policy) in KNOBBED_KV and ":" in policy)


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
    elif kind in KNOBBED_KV:
        try:
            ok = float(arg) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"bad policy {policy!r}: write kv-oneshot:TAU or kv-online:DELTA with a number >= 0")
    else:
        raise ValueError(f"{policy!r} is not a peer policy")
    return policy


def request_options(policy: str, max_thinking_tokens: int | None) -> dict:
    """The ``GenRequest`` options of an engine peer (it starts in slow mode; ``kv-online:DELTA`` routes)."""
    kind, _, arg = policy.partition(":")
    if kind == "kv-online":
        return {"mode": None, "online": True, "max_thinking_tokens": max_thinking_tokens}
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


def online_for(policy: str, online):
    """The ``OnlineConfig`` an engine policy runs with: ``kv-online:DELTA`` overrides delta."""
    if family(policy) == "kv-online" and ":" in policy and online is not None:
        return online.model_copy(update={"delta": float(policy.partition(":")[2])})
    return online


def same_run(runs: dict[str, list[dict]], policy: str, online, run_online) -> list[dict] | None:
    """The records of an engine run in ``runs`` that is the sweep point ``policy`` with ``run_online``:
    the same peer policy by name, or a ``kv-online`` run with the same online settings."""
    if is_engine_peer(policy):
        return runs.get(policy)
    if policy == "kv-online" and run_online is not None:
        for name, records in runs.items():
            if family(name) == "kv-online" and online_for(name, online) == run_online:
                return records
    return None


def choice(policy: str, probe, kv_difficulty: list[float] | None, prompt_lengths: list[int]) -> tuple[list[bool], float]:
    """Which questions a threshold policy answers fast, and its threshold."""
    if family(policy) == "length-oneshot":
        threshold = length_threshold(policy, probe)
        return [n <= threshold for n in prompt_lengths], threshold
    if kv_difficulty is None:
        raise ValueError(f"{policy} needs a probe")
    tau = float(policy.partition(":")[2])
    return [d <= tau for d in kv_difficulty], tau


def knob_policy(family_: str, knob) -> str:
    """A swept family's point as a policy name (``dynasor`` knobs ``K/W`` → ``dynasor:K,W``)."""
    return f"{family_}:{str(knob).replace('/', ',')}"


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
