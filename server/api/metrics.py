"""Prometheus metrics under vLLM's names (dashboards and aiperf read them), plus quantserve_*
memory gauges. Engine counters and gauges are read at scrape time; latency histograms are
observed as each request finishes."""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .memory import device_memory, host_memory, model_memory

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)


class _EngineCollector:
    """Reads every served engine's stats when Prometheus scrapes."""

    def __init__(self, registry_ref: Any) -> None:
        self._registry = registry_ref

    def collect(self) -> Iterable[Any]:
        reg = self._registry
        models = reg.models() if reg.state == "ready" else []
        g = lambda name, doc: GaugeMetricFamily(name, doc, labels=["model_name"])  # noqa: E731
        c = lambda name, doc: CounterMetricFamily(name, doc, labels=["model_name"])  # noqa: E731
        running = g("vllm:num_requests_running", "Requests in the running batch")
        waiting = g("vllm:num_requests_waiting", "Requests waiting to be scheduled")
        kv_usage = g("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)")
        prompt = c("vllm:prompt_tokens", "Prefill tokens processed")
        generation = c("vllm:generation_tokens", "Generated tokens")
        preemptions = c("vllm:num_preemptions", "Preemptions (recompute) so far")
        weight = g("quantserve_model_weight_bytes", "Model weights resident while serving (what /v1/memory reports as weight_bytes)")
        weight16 = g("quantserve_model_weight_16bit_bytes", "The same weights at 16 bits")
        kv_bytes = GaugeMetricFamily("quantserve_kv_cache_bytes", "KV cache bytes", labels=["model_name", "state"])
        hit_rate = g("quantserve_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache")
        path = GaugeMetricFamily("quantserve_forward_path_info", "The forward path and attention backend chosen at "
                                 "start (value 1)", labels=["model_name", "forward", "attention_backend"])
        steps = CounterMetricFamily("quantserve_engine_steps", "Engine steps by how they ran: replayed from a CUDA "
                                    "graph, or eager", labels=["model_name", "mode"])
        # vLLM's, as llm-d's endpoint picker reads it (the Gateway API Inference Extension's model
        # server protocol): the adapters with requests running / waiting, comma-separated, and the
        # most active at once; the value is when it was read (the picker takes the newest sample).
        lora_info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                      labels=["model_name", "max_lora", "waiting_lora_adapters",
                                              "running_lora_adapters"])
        # Speculative decoding (vLLM's names; only for engines that speculate).
        drafts = c("vllm:spec_decode_num_drafts", "Sequence-steps that verified draft tokens")
        draft_tokens = c("vllm:spec_decode_num_draft_tokens", "Draft tokens verified")
        accepted = c("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted")
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by "
                                      "position in the draft (0 = first)", labels=["model_name", "position"])
        for served in models:
            speculation = getattr(served.engine, "speculation", None)
            spec = speculation() if speculation is not None else None
            if spec is not None:
                drafts.add_metric([served.name], spec["num_drafts"])
                draft_tokens.add_metric([served.name], spec["num_draft_tokens"])
                accepted.add_metric([served.name], spec["num_accepted_tokens"])
                for pos, n in enumerate(spec["accepted_per_pos"]):
                    per_pos.add_metric([served.name, str(pos)], n)
            execution = getattr(served.engine, "execution", None)
            if execution is not None:
                e = execution()
                path.add_metric([served.name, e["forward"], e["attention_backend"]], 1)
                for mode, n in e["steps"].items():
                    steps.add_metric([served.name, mode], n)
            s = served.engine.stats()
            name = [served.name]
            running.add_metric(name, s.num_running)
            waiting.add_metric(name, s.num_waiting)
            kv_usage.add_metric(name, s.kv_cache_usage)
            prompt.add_metric(name, s.prompt_tokens_total)
            generation.add_metric(name, s.generation_tokens_total)
            preemptions.add_metric(name, s.num_preemptions)
            mem = model_memory(served)
            if mem["weights"]["weight_bytes"] is not None:
                weight.add_metric(name, mem["weights"]["weight_bytes"])
            if mem["weights"]["weight_bytes_16bit"] is not None:
                weight16.add_metric(name, mem["weights"]["weight_bytes_16bit"])
            if mem["kv_cache"]["bytes_total"] is not None:
                kv_bytes.add_metric([served.name, "total"], mem["kv_cache"]["bytes_total"])
                kv_bytes.add_metric([served.name, "used"], mem["kv_cache"]["bytes_used"])
            hit_rate.add_metric(name, s.prefix_cache_hit_rate)
            adapters = lora_adapters(served.engine)
            if adapters is not None:
                lora_info.add_metric([served.name, *adapters], time.time())
        yield from (running, waiting, kv_usage, prompt, generation, preemptions, weight, weight16, kv_bytes, hit_rate,
                    path, steps, lora_info, drafts, draft_tokens, accepted, per_pos)
        yield from _registry_metrics(reg)
        host = host_memory()
        rss = GaugeMetricFamily("quantserve_host_rss_bytes", "Resident set size of the server process")
        rss.add_metric([], host["rss_bytes"] or 0)
        peak = GaugeMetricFamily("quantserve_host_peak_rss_bytes", "Peak resident set size")
        peak.add_metric([], host["peak_rss_bytes"] or 0)
        dev = GaugeMetricFamily("quantserve_device_memory_bytes", "Device memory", labels=["device", "kind"])
        for d in device_memory():
            for kind in ("total", "free", "allocated", "reserved", "peak_allocated"):
                dev.add_metric([d["device"], kind], d[f"{kind}_bytes"])
        yield from (rss, peak, dev)


def _registry_metrics(reg: Any) -> Iterable[Any]:
    """Every known model's state, loads and unloads; the loaded models' memory against the budget."""
    state = GaugeMetricFamily("quantserve_model_state", "1 for the state each known model is in (loaded, loading, "
                              "unloaded, unloading, error)", labels=["model_name", "state"])
    loads = CounterMetricFamily("quantserve_model_loads", "Loads started", labels=["model_name"])
    unloads = CounterMetricFamily("quantserve_model_unloads", "Unloads done", labels=["model_name"])
    for entry in reg.entries():
        state.add_metric([entry.name, entry.state], 1)
        loads.add_metric([entry.name], entry.loads)
        unloads.add_metric([entry.name], entry.unloads)
    yield from (state, loads, unloads)
    if reg.budget_bytes is not None:
        budget = GaugeMetricFamily("quantserve_models_memory_budget_bytes", "What the loaded models may take "
                                   "together (--models-memory)")
        budget.add_metric([], reg.budget_bytes)
        used = GaugeMetricFamily("quantserve_models_memory_used_bytes", "What the loaded models take, as estimated")
        used.add_metric([], reg.used_bytes())
        yield from (budget, used)


def lora_adapters(engine: Any) -> Optional[tuple[str, str, str]]:
    """(max_lora, waiting adapters, running adapters) as vllm:lora_requests_info's labels, or None
    for an engine that serves no adapters. A scrape copies the scheduler's queues (one C-level copy
    each, under the GIL) rather than iterating them while the engine thread changes them."""
    scheduler = getattr(engine, "scheduler", None)
    max_loras = getattr(scheduler, "max_loras", None)
    if scheduler is None or max_loras is None or getattr(engine, "loras", None) is None:
        return None

    def names(queue: Any) -> str:
        found = {getattr(seq.lora, "name", None) for seq in list(queue) if getattr(seq, "lora", None) is not None}
        return ",".join(sorted(n for n in found if n))

    return str(max_loras), names(scheduler.waiting), names(scheduler.running)


class Metrics:
    def __init__(self, registry_ref: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(registry_ref))
        labels = ["model_name"]
        self.success = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"],
                               registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting before the first engine step",
                               labels, buckets=_E2E_BUCKETS, registry=self.registry)

    def request_finished(self, model: str, timing: Any) -> None:
        if timing.first_token is not None:
            self.ttft.labels(model).observe(timing.first_token - timing.arrival)
            self.e2e.labels(model).observe((timing.last_token or timing.first_token) - timing.arrival)
        for gap in timing.inter_token:
            self.itl.labels(model).observe(gap)
        if timing.queue_time is not None:
            self.queue.labels(model).observe(timing.queue_time)
        for reason in timing.finish_reasons:
            if reason in ("stop", "length"):
                self.success.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
