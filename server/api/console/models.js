// The models panel: every model the server knows (GET /v1/models: state, error, memory), with
// Load and Unload buttons (POST /models/load|unload, with the console's API key). The list is
// polled every few seconds while the page is visible, every second while a model is loading or
// unloading (a chat message to an unloaded model loads it: the server does that by itself).

import { getJSON, request } from "./api.js";
import { mib } from "./memory.js";

const FAST_MS = 1000;
const SLOW_MS = 5000;
const MOVING = new Set(["loading", "unloading"]);

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// "weights 6.5 MiB · KV cache 256.0 MiB · 314.5 MiB in all (measured)"; null: not priced yet.
export function memoryText(memory) {
  if (!memory) return "not estimated yet";
  const how = memory.estimated === false ? "measured" : "estimated";
  return `weights ${mib(memory.weight_bytes)} · KV cache ${mib(memory.kv_cache_bytes)} · `
    + `${mib(memory.total_bytes)} in all (${how})`;
}

export class Models {
  constructor({ onAuthError, onList }) {
    this.onAuthError = onAuthError;
    this.onList = onList; // (cards) => void: every fresh /v1/models answer
    this.cards = [];
    this.pending = new Map(); // model -> "load" | "unload": our own POST in flight
    this.messages = new Map(); // model -> the last failed POST's message (an error state shows its own)
    this.timer = null;
    this.fast = false; // poll every second until nothing is moving
    this.chatting = false; // a chat reply is streaming: its model may be loading for it
    document.addEventListener("visibilitychange", () => (document.hidden ? this.stop() : this.schedule(0)));
  }

  // The base models (LoRA adapters ride on their base and have no state of their own).
  bases() {
    return this.cards.filter((c) => !c.parent);
  }

  moving() {
    return this.pending.size > 0 || this.fast || this.chatting || this.bases().some((c) => MOVING.has(c.state));
  }

  show(cards) {
    this.cards = cards;
    this.render();
    this.schedule();
  }

  // While a chat reply streams, poll fast (its model may be loading for it: the server loads an
  // unloaded model on its first request); when it ends, once more at once.
  chat(streaming) {
    this.chatting = streaming;
    this.schedule(streaming ? FAST_MS : 0);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = null;
    if (document.hidden) return;
    this.timer = setTimeout(() => this.refresh(), delay ?? (this.moving() ? FAST_MS : SLOW_MS));
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  async refresh() {
    let list;
    try {
      list = await getJSON("/v1/models");
    } catch (err) {
      if (err.status === 401) { this.stop(); this.onAuthError(err); return; }
      this.schedule(); // restarting or still loading: try again
      return;
    }
    // After our own POST, fast polling ends once a poll sees nothing moving.
    if (this.fast && this.pending.size === 0 && !list.data.some((c) => !c.parent && MOVING.has(c.state))) {
      this.fast = false;
    }
    this.onList(list.data);
  }

  async act(verb, model) {
    this.pending.set(model, verb);
    this.messages.delete(model);
    this.fast = true;
    this.render();
    this.schedule(FAST_MS); // show "loading" while the POST waits for the load to finish
    try {
      await request(`/models/${verb}`, { method: "POST", body: { model } });
    } catch (err) {
      if (err.status === 401) this.onAuthError(err);
      this.messages.set(model, err.message);
    } finally {
      this.pending.delete(model);
    }
    await this.refresh();
  }

  render() {
    const root = document.getElementById("models-body");
    const bases = this.bases();
    if (!bases.length) {
      root.replaceChildren(el("p", "muted", "no model known"));
      return;
    }
    const table = el("table");
    const head = table.createTHead().insertRow();
    for (const name of ["model", "state", "memory", "keep alive", ""]) head.append(el("th", null, name));
    const body = table.createTBody();
    for (const card of bases) {
      const tr = body.insertRow();
      tr.dataset.model = card.id;
      tr.dataset.state = card.state || "loaded";
      const adapters = this.cards.filter((c) => c.parent === card.id).map((c) => c.id);
      const name = tr.insertCell();
      name.append(el("span", "name", card.id));
      if (adapters.length) name.append(el("span", "muted", ` + LoRA ${adapters.join(", ")}`));

      const state = tr.insertCell();
      const verb = this.pending.get(card.id);
      const shown = verb === "load" && card.state !== "loaded" ? "loading"
        : verb === "unload" && card.state === "loaded" ? "unloading" : card.state || "loaded";
      state.append(el("span", `badge ${shown}`, shown));
      if (card.state === "error" && card.error) state.append(el("div", "error reason", card.error));
      const failed = this.messages.get(card.id);
      if (failed && card.state !== "error") state.append(el("div", "error action-error", failed));

      tr.insertCell().append(el("span", "memory", memoryText(card.memory)));
      tr.insertCell().textContent = card.keep_alive === null || card.keep_alive === undefined ? "forever"
        : `${card.keep_alive} s`;

      const actions = tr.insertCell();
      actions.className = "actions";
      const load = el("button", "load", card.state === "error" ? "Retry" : "Load");
      load.type = "button";
      load.disabled = Boolean(verb) || !["unloaded", "error"].includes(card.state);
      load.addEventListener("click", () => this.act("load", card.id));
      const unload = el("button", "unload quiet", "Unload");
      unload.type = "button";
      unload.disabled = Boolean(verb) || card.state !== "loaded";
      unload.addEventListener("click", () => this.act("unload", card.id));
      actions.append(load, unload);
    }
    root.replaceChildren(table);
  }
}
