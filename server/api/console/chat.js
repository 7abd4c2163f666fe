// The chat playground: the conversation so far, sent with the sampling settings to
// /v1/chat/completions as a stream; each delta is appended to the reply as it arrives.

import { streamEvents } from "./api.js";

const $ = (id) => document.getElementById(id);

export class Chat {
  constructor({ model, onAuthError, onStreaming = () => {} }) {
    this.model = model; // () => the selected model's id
    this.onAuthError = onAuthError;
    this.onStreaming = onStreaming; // (true) when a reply starts, (false) when it ends
    this.history = []; // [{role, content}] of finished turns
    this.controller = null;
    $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); this.send(); }
    });
    $("stop").addEventListener("click", () => this.controller && this.controller.abort());
    $("clear").addEventListener("click", () => { this.history = []; $("messages").replaceChildren(); });
  }

  settings() {
    const body = {
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_tokens: Math.max(1, Math.round(Number($("max-tokens").value))),
    };
    if ($("json-mode").checked) body.response_format = { type: "json_object" };
    return body;
  }

  bubble(role, text) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    div.append(body);
    $("messages").append(div);
    div.scrollIntoView({ block: "end" });
    return div;
  }

  async send() {
    const text = $("prompt").value.trim();
    const model = this.model();
    if (!text || this.controller || !model) return;
    $("prompt").value = "";
    this.bubble("user", text);
    const messages = [...this.history, { role: "user", content: text }];
    const reply = this.bubble("assistant", "");
    reply.classList.add("streaming");
    const out = reply.querySelector(".text");
    const stats = document.createElement("div");
    stats.className = "stats";
    reply.append(stats);

    this.controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    let firstAt = null, usage = null, finish = null;
    this.onStreaming(true);
    try {
      await streamEvents("/v1/chat/completions", {
        model, messages, stream: true, stream_options: { include_usage: true }, ...this.settings(),
      }, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = performance.now();
          out.textContent += choice.delta.content;
          reply.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }, this.controller.signal);
      this.history = [...messages, { role: "assistant", content: out.textContent }];
    } catch (err) {
      if (err.name === "AbortError") finish = "stopped";
      else {
        reply.classList.add("failed");
        const error = document.createElement("div");
        error.className = "error";
        error.textContent = err.message;
        reply.append(error);
        if (err.status === 401) this.onAuthError(err);
      }
    } finally {
      const end = performance.now();
      const parts = [];
      if (usage) parts.push(`${usage.completion_tokens} tokens`);
      if (firstAt !== null) parts.push(`first token ${(firstAt - started).toFixed(0)} ms`);
      if (usage && firstAt !== null && usage.completion_tokens > 1 && end > firstAt) {
        parts.push(`${((usage.completion_tokens - 1) / ((end - firstAt) / 1000)).toFixed(1)} tok/s`);
      }
      if (finish) parts.push(`finish: ${finish}`);
      stats.textContent = parts.join(" · ");
      reply.classList.remove("streaming");
      reply.dataset.done = "true";
      this.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      this.onStreaming(false);
    }
  }
}
