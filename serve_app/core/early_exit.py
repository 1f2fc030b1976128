"""Peer policies that end a thought early, as their papers define them (issue 21; docs/method.md §8).

Both probe the answer in a **side branch**: the live reply's cache rows are copied, the close-think
tokens (and an optional answer prefix) are appended there, and the answer is decoded greedily; the
main reply never sees those tokens (``serve_app.engines.early_exit`` runs the branch).

* **Dynasor-CoT** (answer consistency; Fu et al., arXiv 2412.20993): probe every ``every`` thinking
  tokens; end the thought once the last ``window`` probed answers are complete and equal.
* **DEER** (trial-answer confidence; Yang et al., arXiv 2504.15895): probe at every reasoning-step
  boundary (a generated token that ends a line); end the thought once the trial answer is complete
  and the mean probability of its tokens exceeds ``threshold`` (the paper's lambda).

Ending a thought appends the close-think tokens to the main reply (counted, like a thinking cap or
a switch) and the model writes its answer there. Side-branch tokens are counted apart
(``GenResult.probe_tokens``): the papers report tokens both with and without them.

This module is pure (no torch): the rules, the parameters and their parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

EXIT_KINDS = ("dynasor", "deer")


@dataclass(frozen=True)
class EarlyExit:
    """One reply's early-exit rule (``GenRequest.early_exit``)."""

    kind: Literal["dynasor", "deer"]
    every: int = 32
    """dynasor: probe after every this many thinking tokens."""
    window: int = 3
    """dynasor: end when this many consecutive probed answers agree."""
    threshold: float = 0.95
    """deer: end when the trial answer's mean token probability exceeds this."""
    max_answer_tokens: int = 12
    """A probed answer that has not ended (EOS) within this many tokens is no answer."""
    answer_prefix: str = ""
    """Text after the close-think tokens that starts the answer in the side branch (the Dynasor
    paper uses ``... **Final Answer**\\n\\n\\[ \\boxed{``; the embedded model answers directly)."""

    def __post_init__(self):
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"unknown early-exit kind {self.kind!r}; choose from {list(EXIT_KINDS)}")
        if self.every < 1 or self.window < 1 or self.max_answer_tokens < 1:
            raise ValueError("early exit: every, window and max_answer_tokens must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("early exit: the DEER threshold must lie in (0, 1]")

    @property
    def label(self) -> str:
        """The policy name that selects this rule (``dynasor:32,3``, ``deer:0.95``)."""
        return f"dynasor:{self.every},{self.window}" if self.kind == "dynasor" else f"deer:{self.threshold:g}"


def parse_exit(policy: str) -> EarlyExit:
    """``dynasor`` / ``dynasor:K`` / ``dynasor:K,W`` and ``deer`` / ``deer:LAMBDA`` (defaults: the
    dataclass's). A clear ``ValueError`` for anything else."""
    kind, _, args = policy.partition(":")
    if kind not in EXIT_KINDS:
        raise ValueError(f"{policy!r} is not an early-exit policy ({', '.join(EXIT_KINDS)})")
    parts = [a for a in args.split(",") if a] if args else []
    try:
        if kind == "dynasor":
            if len(parts) > 2:
                raise ValueError
            keys = ("every", "window")[: len(parts)]
            return EarlyExit("dynasor", **{k: int(v) for k, v in zip(keys, parts)})
        if len(parts) > 1:
            raise ValueError
        return EarlyExit("deer", **({"threshold": float(parts[0])} if parts else {}))
    except ValueError as exc:
        hint = "dynasor[:K[,W]] with whole numbers K, W >= 1" if kind == "dynasor" else "deer[:LAMBDA] with 0 < LAMBDA <= 1"
        raise ValueError(f"bad policy {policy!r}: write {hint}") from exc


def split_policies(text: str) -> list[str]:
    """A comma list of policies whose parameters may hold commas themselves (``dynasor:32,3``): an
    item that is only a number continues the policy before it."""
    out: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if out and ":" in out[-1] and item.replace(".", "", 1).isdigit():
            out[-1] += f",{item}"
        else:
            out.append(item)
    return out


def probe_due(rule: EarlyExit, think_tokens: int, ends_line: bool) -> bool:
    """Whether a thought that now holds ``think_tokens`` tokens, the last of which ends a line when
    ``ends_line``, is probed now."""
    if rule.kind == "dynasor":
        return think_tokens > 0 and think_tokens % rule.every == 0
    return ends_line


def answers_agree(answers: Sequence[str | None], window: int) -> bool:
    """Dynasor's rule: the last ``window`` probed answers are all complete (not None) and equal."""
    last = list(answers[-window:])
    return len(last) == window and last[0] is not None and all(a == last[0] for a in last)


def confident(probs: Sequence[float], threshold: float) -> bool:
    """DEER's rule: the trial answer's mean token probability exceeds ``threshold`` (an empty
    answer is never confident)."""
    return bool(probs) and sum(probs) / len(probs) > threshold


def should_exit(rule: EarlyExit, answers: Sequence[str | None], probs: Sequence[float]) -> bool:
    """After a probe: ``answers`` are every probed answer so far (None: not complete), ``probs``
    the token probabilities of the latest one."""
    if rule.kind == "dynasor":
        return answers_agree(answers, rule.window)
    return answers[-1] is not None and confident(probs, rule.threshold)
