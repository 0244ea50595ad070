"""Touchpoint: SGLang's pool statistics (`SchedulerPoolStatsObserver._get_token_info`), the
source of its "token usage" log line and of its Prometheus pool gauges.

Under --kv-compression SGLang would report the logical space, which says nothing about
memory (a logical slot holds no bytes). The hook reports instead the real share of KV bytes
in use: group slots neither free nor evictable, weighted by each group's bytes per slot.
With `--enable-metrics` it also sets Tangram's own series on SGLang's Prometheus endpoint
(`prometheus_client`, which SGLang's multiprocess collector exports): per head group
`tangram:group_{free,reserved,evictable,overdrawn}_slots`, the counters
`tangram:{never_fit,recomputed_prefix,retraction,stale,settle_refused}_total`, and
`tangram:group_split_fill`: per group, the finished turns' slot demand over the planned
split's, mean 1 (`memory/split_check.py`; groups far apart: the traffic has another shape
than `--tangram-workload`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator
from tangram_sglang.memory.radix import evictable_group_slots
from tangram_sglang.memory.reservation import EVENTS

from . import Hook

GAUGES = ("free", "reserved", "evictable", "overdrawn")


def kv_usage(allocator: TangramAllocator, evictable: tuple[int, ...]) -> float:
    """Share of the pools' KV bytes held by slots that are neither free nor evictable."""
    pool = allocator.pool
    used = total = 0.0
    for slots, free, evict, nbytes in zip(
        pool.slots, pool.free_slots(), evictable, pool.bytes_per_group(), strict=True
    ):
        per_slot = nbytes / (slots + pool.page_size)
        used += (slots - free - evict) * per_slot
        total += slots * per_slot
    return used / total if total else 0.0


class TangramMetrics:
    """Tangram's Prometheus series, created once per scheduler process."""

    def __init__(self, labels: dict[str, str]) -> None:
        from prometheus_client import Counter, Gauge  # after SGLang set its multiproc dir

        names = [*labels, "group"]
        self.labels = labels
        self.gauges = {
            name: Gauge(
                f"tangram:group_{name}_slots",
                f"Head-group slots {name} (tangram-sglang), per group.",
                labelnames=names,
                multiprocess_mode="mostrecent",
            )
            for name in GAUGES
        }
        self.counters = {
            event: Counter(
                f"tangram:{event}",
                f"Budget Reservation events: {event.replace('_', ' ')} (tangram-sglang).",
                labelnames=list(labels),
            )
            for event in EVENTS
        }
        for counter in self.counters.values():
            counter.labels(**labels)  # exported at 0 before the first event
        self.seen = dict.fromkeys(self.counters, 0)
        self.split_fill = Gauge(
            "tangram:group_split_fill",
            "Finished turns' slot demand over the planned split's per head group, mean 1 "
            "(tangram-sglang): groups apart mean another session shape than planned.",
            labelnames=names,
            multiprocess_mode="mostrecent",
        )

    def update(self, allocator: TangramAllocator, evictable: tuple[int, ...]) -> None:
        budget = allocator.budget
        values = {
            "free": allocator.pool.free_slots(),
            "reserved": budget.reserved(),
            "evictable": evictable,
            "overdrawn": tuple(budget.overdrawn.tolist()),
        }
        for name, per_group in values.items():
            for g, value in enumerate(per_group):
                self.gauges[name].labels(**self.labels, group=str(g)).set(value)
        check = allocator.split_check
        if check is not None and check.turns:
            for g, value in enumerate(check.fill()):
                self.split_fill.labels(**self.labels, group=str(g)).set(value)
        for event, counter in self.counters.items():
            count = budget.events[event]
            if count > self.seen[event]:
                counter.labels(**self.labels).inc(count - self.seen[event])
                self.seen[event] = count


_metrics: TangramMetrics | None = None


def _publish(allocator: TangramAllocator, evictable: tuple[int, ...]) -> None:
    global _metrics
    from sglang.srt.server_args import get_global_server_args

    server_args = get_global_server_args()
    if not getattr(server_args, "enable_metrics", False):
        return
    if _metrics is None:
        _metrics = TangramMetrics({"model_name": server_args.served_model_name})
    _metrics.update(allocator, evictable)


def token_info(original: Any, self: Any) -> Any:
    stats = original(self)
    allocator = self.token_to_kv_pool_allocator
    if not isinstance(allocator, TangramAllocator):
        return stats
    evictable = evictable_group_slots(self.tree_cache, allocator.pool.num_groups)
    _publish(allocator, evictable)
    return dataclasses.replace(stats, full_token_usage=kv_usage(allocator, evictable))


HOOKS = (
    Hook(
        "sglang.srt.managers.scheduler_components.pool_stats_observer."
        "SchedulerPoolStatsObserver._get_token_info",
        token_info,
        HookType.AROUND,
    ),
)
