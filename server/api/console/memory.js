// Memory by part, from /v1/memory: one stacked bar per place the bytes live (the host's RSS, and
// each GPU when there is one), split into weights, KV cache (in use / reserved) and the rest.
// "The rest" is what is measured minus the parts the server counts itself: activations,
// the runtime and its libraries. On the host the KV cache's pages are touched lazily, so RSS can
// hold less than the whole reserve: the rest is then floored at zero.

const COLORS = { weights: "#2563eb", kvUsed: "#0891b2", kvFree: "#a5e3ee", rest: "#f59e0b" };

export function mib(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return bytes >= 10 * 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function bar(title, parts, whole, wholeLabel) {
  const box = el("div", "membar");
  box.append(el("div", "membar-title", `${title}: ${mib(whole)} ${wholeLabel}`));
  const track = el("div", "membar-track");
  const legend = el("div", "membar-legend");
  for (const part of parts) {
    if (!part.bytes || part.bytes <= 0) continue;
    const seg = el("span", "membar-seg");
    seg.style.width = `${Math.min(100, (100 * part.bytes) / whole)}%`;
    seg.style.background = part.color;
    seg.title = `${part.label}: ${mib(part.bytes)}`;
    track.append(seg);
    const item = el("span", "item");
    const swatch = el("i");
    swatch.style.background = part.color;
    item.append(swatch, `${part.label} ${mib(part.bytes)}`);
    legend.append(item);
  }
  box.append(track, legend);
  return box;
}

export function renderMemory(root, memory, served) {
  const weights = served ? served.weights.weight_bytes : 0;
  const kv = served ? served.kv_cache : {};
  const kvTotal = kv.bytes_total || 0;
  const kvUsed = kv.bytes_used || 0;
  const own = [
    { label: "weights", bytes: weights, color: COLORS.weights },
    { label: "KV in use", bytes: kvUsed, color: COLORS.kvUsed },
    { label: "KV reserved", bytes: kvTotal - kvUsed, color: COLORS.kvFree },
  ];
  const bars = [];
  const gpus = memory.devices || [];
  if (gpus.length) {
    // The model and its KV cache live on the (first) GPU; the rest of what torch allocated there
    // is activations and workspace. The host keeps the Python process.
    const [gpu, ...others] = gpus;
    const rest = gpu.allocated_bytes - weights - kvTotal;
    bars.push(bar(`${gpu.device} ${gpu.name}`, [...own, { label: "activations, workspace", bytes: rest, color: COLORS.rest }],
      gpu.total_bytes, `total, ${mib(gpu.free_bytes)} free, ${mib(gpu.peak_allocated_bytes)} peak allocated`));
    for (const d of others) {
      bars.push(bar(`${d.device} ${d.name}`, [{ label: "allocated", bytes: d.allocated_bytes, color: COLORS.rest }],
        d.total_bytes, "total"));
    }
    bars.push(bar("host RSS", [{ label: "process", bytes: memory.host.rss_bytes, color: COLORS.rest }],
      memory.host.rss_bytes, `(peak ${mib(memory.host.peak_rss_bytes)})`));
  } else {
    const rss = memory.host.rss_bytes || 0;
    const rest = Math.max(0, rss - weights - kvTotal);
    bars.push(bar("host RSS", [...own, { label: "activations, runtime, libraries", bytes: rest, color: COLORS.rest }],
      Math.max(rss, weights + kvTotal), `(peak ${mib(memory.host.peak_rss_bytes)}, machine ${mib(memory.host.available_bytes)} available)`));
  }
  const notes = el("p", "muted");
  if (served) {
    const w = served.weights;
    const saving = w.saving_ratio ? `, ${w.saving_ratio}× smaller than at 16 bits (${mib(w.weight_bytes_16bit)})` : "";
    notes.textContent = `Weights ${mib(w.weight_bytes)}${saving}; ${w.quantized_layers} layers quantized, `
      + `${w.kept_layers} kept. KV cache ${kv.blocks_used} of ${kv.blocks_total} blocks in use; `
      + `prefix cache hit rate ${(100 * (kv.prefix_cache_hit_rate || 0)).toFixed(0)}%.`;
  }
  root.replaceChildren(...bars, notes);
}
