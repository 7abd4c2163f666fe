// Live figures, polled about once a second while the page is visible: /metrics (Prometheus text:
// tokens, requests, latency histograms) and /v1/memory (KV blocks, memory by part).
// Rates and mean latencies come from the difference between two scrapes.

import { getJSON, getText } from "./api.js";
import { LineChart } from "./charts.js";
import { renderMemory } from "./memory.js";

const PERIOD_MS = 1000;

// "name{a="x",b="y"} 12.5" -> {name, labels, value}; comments and blank lines skipped.
export function parsePrometheus(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^{\s]+)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function total(samples, name, model) {
  return samples
    .filter((s) => s.name === name && (!model || !s.labels.model_name || s.labels.model_name === model))
    .reduce((sum, s) => sum + s.value, 0);
}

// Speculative decoding (vLLM's counters), shown only for a model that speculates: verifications,
// draft tokens accepted, and the acceptance at each draft position (accepted there / verifications).
export function speculation(samples, model) {
  const mine = (s) => !model || !s.labels.model_name || s.labels.model_name === model;
  if (!samples.some((s) => s.name === "vllm:spec_decode_num_drafts_total" && mine(s))) return null;
  const drafts = total(samples, "vllm:spec_decode_num_drafts_total", model);
  const drafted = total(samples, "vllm:spec_decode_num_draft_tokens_total", model);
  const accepted = total(samples, "vllm:spec_decode_num_accepted_tokens_total", model);
  const positions = samples
    .filter((s) => s.name === "vllm:spec_decode_num_accepted_tokens_per_pos_total" && mine(s))
    .sort((a, b) => Number(a.labels.position) - Number(b.labels.position))
    .map((s) => (drafts ? s.value / drafts : 0));
  return { drafts, drafted, accepted, positions };
}

function renderSpeculation(el, spec) {
  el.hidden = spec === null;
  if (spec === null) return;
  const pct = (v) => `${(100 * v).toFixed(0)}%`;
  const rate = spec.drafted ? ` (${pct(spec.accepted / spec.drafted)})` : "";
  const byPosition = spec.positions.length ? `; accepted by draft position: ${spec.positions.map(pct).join(", ")}` : "";
  el.textContent = `Speculative decoding: ${spec.drafts} verifications, ${spec.accepted} of ${spec.drafted} draft ` +
    `tokens accepted${rate}${byPosition}`;
}

export class Live {
  constructor({ model, onAuthError, onStatus, onRecover }) {
    this.model = model; // () => the base model whose figures to show
    this.onAuthError = onAuthError;
    this.onStatus = onStatus;
    this.onRecover = onRecover; // called once polling succeeds again after a failure
    this.failing = false;
    this.timer = null;
    this.previous = null;
    this.started = performance.now();
    const chart = (id, options) =>
      new LineChart(document.getElementById(`chart-${id}`), document.querySelector(`.legend[data-chart="${id}"]`), options);
    const ms = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));
    this.charts = {
      tokens: chart("tokens", { series: [{ label: "tok/s", color: "#2563eb" }] }),
      requests: chart("requests", {
        series: [{ label: "running", color: "#16a34a" }, { label: "waiting", color: "#dc2626" }],
        format: (v) => v.toFixed(v % 1 ? 1 : 0), minMax: 3,
      }),
      latency: chart("latency", {
        series: [{ label: "TTFT", color: "#9333ea", dots: true }, { label: "inter-token", color: "#ea580c", dots: true }],
        format: ms, minMax: 10,
      }),
      kv: chart("kv", { series: [{ label: "blocks", color: "#0891b2" }], format: (v) => v.toFixed(0), minMax: 3 }),
    };
    document.addEventListener("visibilitychange", () => (document.hidden ? this.stop() : this.start()));
  }

  start() {
    if (this.timer !== null || document.hidden) return;
    this.previous = null; // a rate across a hidden stretch would be a long average: start afresh
    document.getElementById("live-state").textContent = "";
    const tick = async () => {
      await this.poll();
      if (this.timer !== null) this.timer = setTimeout(tick, PERIOD_MS);
    };
    this.timer = setTimeout(tick, 0);
  }

  stop() {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    document.getElementById("live-state").textContent = "(paused while the page is hidden)";
  }

  async poll() {
    const model = this.model();
    let text, memory;
    try {
      [text, memory] = await Promise.all([getText("/metrics"), getJSON("/v1/memory")]);
    } catch (err) {
      if (err.status === 401) this.onAuthError(err);
      else this.onStatus(`live figures unavailable: ${err.message}`, true);
      this.failing = true;
      return;
    }
    if (this.failing) {
      this.failing = false;
      this.onRecover();
    }
    const t = (performance.now() - this.started) / 1000;
    const samples = parsePrometheus(text);
    const now = {
      t,
      generated: total(samples, "vllm:generation_tokens_total", model),
      ttftSum: total(samples, "vllm:time_to_first_token_seconds_sum", model),
      ttftCount: total(samples, "vllm:time_to_first_token_seconds_count", model),
      itlSum: total(samples, "vllm:inter_token_latency_seconds_sum", model),
      itlCount: total(samples, "vllm:inter_token_latency_seconds_count", model),
    };
    const prev = this.previous;
    this.previous = now;
    const mean = (sum, count) => (prev && now[count] > prev[count]
      ? (1000 * (now[sum] - prev[sum])) / (now[count] - prev[count]) : null);
    this.charts.tokens.push(t, [prev ? (now.generated - prev.generated) / (t - prev.t) : null]);
    this.charts.requests.push(t, [
      total(samples, "vllm:num_requests_running", model),
      total(samples, "vllm:num_requests_waiting", model),
    ]);
    this.charts.latency.push(t, [mean("ttftSum", "ttftCount"), mean("itlSum", "itlCount")]);
    renderSpeculation(document.getElementById("spec"), speculation(samples, model));
    const served = memory.models.find((m) => m.model === model) || memory.models[0];
    this.charts.kv.push(t, [served ? served.kv_cache.blocks_used : null]);
    renderMemory(document.getElementById("memory"), memory, served);
  }
}
