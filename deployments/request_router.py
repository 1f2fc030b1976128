"""Inside a pool: send each request to the replica with the fewest predicted outstanding tokens.

Replicas publish ``{"queued", "running", "predicted_tokens"}`` via ``record_routing_stats``
(every ``request_routing_stats_period_s``). Requests this router sent more recently than one
report period are not in those figures yet, so their predicted tokens are added on top: a burst
does not pile onto one replica. Ties are broken at random."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.serving.messages import Job


def _predicted(pending: Optional[PendingRequest]) -> float:
    """The ``Job``'s predicted tokens (0 for calls that carry no job, e.g. stats polls)."""
    job = pending.args[0] if pending is not None and pending.args else None
    return float(job.predicted_tokens) if isinstance(job, Job) else 0.0


class PredictedTokensRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, stats_period_s: float = 0.5, **kwargs) -> None:
        self._fresh_s = 2 * stats_period_s
        self._sent: dict[ReplicaID, dict[str, tuple[float, float]]] = defaultdict(dict)

    def _load(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        cutoff = time.monotonic() - self._fresh_s
        recent = sum(tokens for at, tokens in self._sent[replica.replica_id].values() if at >= cutoff)
        return float(stats.get("predicted_tokens", 0.0)) + recent

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        # ties (idle replicas, short requests that finished) go to a random one: a stable sort
        # would hand every tie to the same replica
        ranked = sorted(candidate_replicas, key=lambda r: (self._load(r), random.random()))
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._sent[replica_id][pending_request.metadata.internal_request_id] = (time.monotonic(), _predicted(pending_request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._sent[replica_id].pop(internal_request_id, None)
