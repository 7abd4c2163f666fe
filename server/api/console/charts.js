// A small line chart on a canvas: a window of the last `span` seconds, one line per series, a
// y axis scaled to what is shown. A null value leaves a gap (no sample for that second).

const GRID = "#e3e6ea";
const TEXT = "#5b6470";

export class LineChart {
  constructor(canvas, legend, { series, span = 120, format = (v) => v.toFixed(1), minMax = 1 }) {
    this.canvas = canvas;
    this.legend = legend;
    this.series = series.map((s) => ({ ...s, points: [] })); // points: [seconds, value|null]
    this.span = span;
    this.format = format;
    this.minMax = minMax;
    this.updates = 0;
  }

  push(t, values) {
    this.series.forEach((s, i) => {
      s.points.push([t, values[i] ?? null]);
      while (s.points.length && s.points[0][0] < t - this.span) s.points.shift();
    });
    this.updates += 1;
    this.draw(t);
  }

  draw(now) {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const values = this.series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
    const top = niceCeil(Math.max(this.minMax, ...values));
    const left = 44, right = 6, upper = 6, lower = 16;
    const plotW = width - left - right, plotH = height - upper - lower;
    const x = (t) => left + plotW * (1 - (now - t) / this.span);
    const y = (v) => upper + plotH * (1 - v / top);

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = TEXT;
    ctx.strokeStyle = GRID;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 3; i++) {
      const v = (top * i) / 3;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y(v)) + 0.5);
      ctx.lineTo(width - right, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillText(this.format(v), left - 4, y(v));
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "bottom";
    ctx.fillText(`−${this.span} s`, left, height);
    ctx.textAlign = "right";
    ctx.fillText("now", width - right, height);

    ctx.lineWidth = 1.75;
    for (const s of this.series) {
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      let drawing = false;
      for (const [t, v] of s.points) {
        if (v === null) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(t), y(v));
        else ctx.moveTo(x(t), y(v));
        drawing = true;
      }
      ctx.stroke();
      // Sparse series (a latency exists only for seconds in which requests finished): a dot
      // per sample, or a lone sample would not show at all.
      if (s.dots) {
        ctx.fillStyle = s.color;
        for (const [t, v] of s.points) {
          if (v === null) continue;
          ctx.beginPath();
          ctx.arc(x(t), y(v), 2.5, 0, 2 * Math.PI);
          ctx.fill();
        }
      }
    }
    this.drawLegend();
  }

  drawLegend() {
    if (!this.legend) return;
    this.legend.replaceChildren(...this.series.map((s) => {
      // The latest sample that has a value: a sparse series keeps showing its last one.
      const last = s.points.reduce((found, p) => (p[1] === null ? found : p[1]), null);
      const item = document.createElement("span");
      item.className = "item";
      const swatch = document.createElement("i");
      swatch.style.background = s.color;
      item.append(swatch, `${s.label} ${last === null ? "–" : this.format(last)}`);
      return item;
    }));
  }
}

// The smallest of 1.5, 3, 6 or 15 times a power of ten at or above v: the three gridlines
// then fall on round numbers (0.5 1 1.5, 1 2 3, 2 4 6, 5 10 15).
function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1.5, 3, 6]) if (v <= m * p * 1.0001) return m * p;
  return 15 * p;
}
