"""PrefixAwareRouter: a Ray Serve RequestRouter (ray.serve.request_router's public API) that sends
requests whose prompts share a prefix to the replica that served it, while the load stays level.

The rule (server/ray/prefix.py's PrefixTable.rank): among the replicas with at most
`max_imbalance` more requests in flight than the least loaded one, the one that has served the
longest prefix of this prompt; no match: the least loaded, then the one holding fewest prefixes.
Each choice is a rank of its own, best first: when the preferred replica is at its
max_ongoing_requests, Ray takes the next. A request carrying x-quantserve-replica goes to that
replica (its /metrics, or a Responses conversation kept there) while it lives.

Loads are this router's own count of requests it sent and that have not finished. The router
lives in the ingress replica that holds the handle: with several ingress replicas each counts its
own share (and keeps its own table), which is why one ingress replica is the default."""

from __future__ import annotations

from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .prefix import PrefixTable


def _forwarded(pending_request: Optional[PendingRequest]) -> Any:
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if hasattr(a, "prompt")), None)


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, max_imbalance: int = 8, block_chars: int = 64, max_entries: int = 100_000,
                         **_: Any) -> None:
        self._table = PrefixTable(block_chars, max_entries)
        self._max_imbalance = max_imbalance
        self._in_flight: dict[str, int] = {}
        # Chosen but not yet sent (request id -> first choice): counted as load, so that a burst of
        # new prefixes arriving together spreads instead of all going to the same idle replica.
        self._pending: dict[str, str] = {}

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait, don't spin
        request = _forwarded(pending_request)
        if request is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if request.replica is not None and request.replica in by_id:
            return [[by_id[request.replica]]]
        request_id = pending_request.metadata.internal_request_id
        self._pending.pop(request_id, None)
        loads = {rid: self._in_flight.get(rid, 0) for rid in by_id}
        for rid in self._pending.values():
            if rid in loads:
                loads[rid] += 1
        ranked = self._table.rank(request.prompt, loads, self._max_imbalance)
        self._pending[request_id] = ranked[0]
        if request.prompt:  # held there from now on (the same replica almost always takes it)
            self._table.insert(request.prompt, ranked[0])
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = replica_id.unique_id
        self._pending.pop(pending_request.metadata.internal_request_id, None)
        self._in_flight[rid] = self._in_flight.get(rid, 0) + 1
        request = _forwarded(pending_request)
        if request is not None and request.prompt:
            self._table.insert(request.prompt, rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        if self._in_flight.get(rid, 0) > 0:
            self._in_flight[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._drop(replica_id.unique_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        for gone in before - {r.unique_id for r in self._replica_id_set}:
            self._drop(gone)

    def _drop(self, rid: str) -> None:
        self._table.forget(rid)
        self._in_flight.pop(rid, None)
