// The per-layer quantization report, GET /v1/models/{id}/quantization:
// {"summary": {...}, "layers": [{"name", "format", "shape", "bits_per_param", "rel_error",
// "absmax", "outlier_fraction", ...}]}. A server without the report (404) shows "no report".
// Columns are the known ones first, then any other field the layers carry; click to sort.

import { getJSON } from "./api.js";

const KNOWN = ["name", "format", "shape", "bits_per_param", "rel_error", "absmax", "outlier_fraction"];

function cell(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return value.join("×");
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const a = Math.abs(value);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? value.toExponential(3) : value.toPrecision(4);
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

export class QuantReport {
  constructor({ onAuthError }) {
    this.onAuthError = onAuthError;
    this.report = null;
    this.sortKey = null;
    this.descending = false;
  }

  // No report to ask for (the model is not loaded): say why instead.
  clear(text) {
    this.report = null;
    document.getElementById("quant-summary").textContent = "";
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = text;
    document.getElementById("quant-body").replaceChildren(p);
  }

  async load(model) {
    const body = document.getElementById("quant-body");
    const summary = document.getElementById("quant-summary");
    this.report = null;
    summary.textContent = "";
    try {
      this.report = await getJSON(`/v1/models/${encodeURIComponent(model)}/quantization`);
    } catch (err) {
      if (err.status === 401) this.onAuthError(err);
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = err.status === 404 ? "no report (this server does not publish one for this model)"
        : `no report: ${err.message}`;
      body.replaceChildren(p);
      return;
    }
    summary.textContent = Object.entries(this.report.summary || {})
      .filter(([, v]) => typeof v !== "object" || v === null)
      .map(([k, v]) => `${k.replaceAll("_", " ")} ${cell(v)}`).join(" · ");
    this.render();
  }

  render() {
    const layers = [...(this.report.layers || [])];
    const extra = [...new Set(layers.flatMap((l) => Object.keys(l)))].filter((k) => !KNOWN.includes(k));
    const columns = [...KNOWN.filter((k) => layers.some((l) => k in l)), ...extra];
    if (this.sortKey) {
      const k = this.sortKey, sign = this.descending ? -1 : 1;
      layers.sort((a, b) => sign * (a[k] < b[k] ? -1 : a[k] > b[k] ? 1 : 0));
    }
    // rel_error drawn as a bar against the worst layer, so the outliers stand out.
    const worst = Math.max(0, ...layers.map((l) => (typeof l.rel_error === "number" ? l.rel_error : 0)));
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    for (const k of columns) {
      const th = document.createElement("th");
      th.textContent = k + (this.sortKey === k ? (this.descending ? " ▼" : " ▲") : "");
      th.addEventListener("click", () => {
        this.descending = this.sortKey === k ? !this.descending : k !== "name";
        this.sortKey = k;
        this.render();
      });
      head.append(th);
    }
    const rows = table.createTBody();
    for (const layer of layers) {
      const tr = rows.insertRow();
      for (const k of columns) {
        const td = tr.insertCell();
        const value = document.createElement("span");
        value.className = "v";
        value.textContent = cell(layer[k]);
        td.append(value);
        if (typeof layer[k] === "number") td.className = "num";
        if (k === "rel_error" && worst > 0 && typeof layer[k] === "number") {
          const b = document.createElement("span");
          b.className = "errbar";
          b.style.width = `${(100 * layer[k]) / worst}%`;
          td.prepend(b);
        }
      }
    }
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    wrap.append(table);
    document.getElementById("quant-body").replaceChildren(wrap);
  }
}
