// The console's entry point: finds the models (asking for the API key when the server answers
// 401), then runs the models panel, the chat playground, the live charts and the quantization
// report.

import { apiKey, getJSON, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { Live } from "./live.js";
import { Models } from "./models.js";
import { QuantReport } from "./quant.js";

const $ = (id) => document.getElementById(id);
let cards = []; // /v1/models' data: every known model (`state`), and LoRA adapters with their base as `parent`
let shownState = null; // the picked model's state when its report was last asked for
const selectedModel = () => $("model").value;
// Metrics, memory and the quantization report belong to the base model an adapter runs on.
const selectedBase = () => {
  const card = cards.find((c) => c.id === selectedModel());
  return card ? card.parent || card.id : "";
};

function status(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

function showKeyForm(message, isError) {
  $("key-message").textContent = message;
  $("key-message").classList.toggle("error", isError);
  $("key-form").hidden = false;
  $("key-input").value = apiKey();
  $("key-input").focus();
}

// A 401 from any call: the polling stops until a key is given (it would only fail again).
function askForKey(err) {
  live.stop();
  $("live-state").textContent = "";
  status("API key needed", true);
  showKeyForm(err.message, true);
}

const chat = new Chat({ model: selectedModel, onAuthError: askForKey, onStreaming: (on) => models.chat(on) });
const live = new Live({ model: selectedBase, onAuthError: askForKey, onStatus: status, onRecover: () => connect() });
const quant = new QuantReport({ onAuthError: askForKey });
const models = new Models({ onAuthError: askForKey, onList: (list) => showModels(list) });
let retry = null;

async function connect() {
  clearTimeout(retry);
  let listing;
  try {
    listing = await getJSON("/v1/models");
  } catch (err) {
    if (err.status === 401) return askForKey(err);
    // 503 while the model loads; anything else (server restarting) is retried too.
    status(err.status === 503 ? err.message : `cannot reach the server: ${err.message}`, true);
    retry = setTimeout(connect, err.status === 503 ? 2000 : 5000);
    return;
  }
  $("key-form").hidden = true;
  showModels(listing.data);
  live.start();
}

// An adapter has its base's state.
const stateOf = (card) => {
  if (!card) return undefined;
  return card.parent ? (cards.find((c) => c.id === card.parent) || {}).state : card.state;
};

function describe(card) {
  const state = stateOf(card);
  const base = card.parent ? `${card.id} (LoRA adapter on ${card.parent})` : card.id;
  return !state || state === "loaded" ? base : `${base} · ${state}`;
}

function showStatus() {
  const card = cards.find((c) => c.id === selectedModel());
  const state = stateOf(card);
  if (!card) status("no model served", true);
  else if (state === "error") status(`${selectedBase()} failed to load`, true);
  else if (state && state !== "loaded") status(`${selectedBase()} is ${state}: the first message loads it`);
  else status(`ready · context ${card.max_model_len ?? "?"} tokens`);
}

// A fresh /v1/models answer: the picker (every model, loaded or not: a message to an unloaded one
// loads it), the status line, the models panel; the report once the picked model is loaded.
function showModels(list) {
  const picker = $("model");
  const previous = picker.value;
  cards = list;
  const labels = cards.map((card) => [card.id, describe(card)]);
  const shown = [...picker.options].map((o) => [o.value, o.textContent]);
  if (JSON.stringify(labels) !== JSON.stringify(shown)) { // untouched otherwise: an open picker stays open
    picker.replaceChildren(...labels.map(([id, label]) => {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = label;
      return option;
    }));
    if (cards.some((c) => c.id === previous)) picker.value = previous;
  }
  if (!previous) { // first answer: the model a request naming none gets (the first loaded one)
    const first = cards.find((c) => !c.parent && (c.state || "loaded") === "loaded");
    if (first) picker.value = first.id;
  }
  showStatus();
  models.show(cards);
  const state = stateOf(cards.find((c) => c.id === picker.value));
  if (picker.value !== previous || state !== shownState) showReport();
}

// The report of the picked model's base, once it is loaded (an unloaded model has none yet).
function showReport() {
  const card = cards.find((c) => c.id === selectedModel());
  shownState = stateOf(card);
  if (!card) return;
  if (!shownState || shownState === "loaded") quant.load(selectedBase());
  else quant.clear(`no report: ${selectedBase()} is ${shownState} (loaded, it has one)`);
}

$("model").addEventListener("change", () => {
  live.previous = null;
  showStatus();
  showReport();
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("key-input").value.trim());
  connect();
});
$("key-button").addEventListener("click", () => showKeyForm("The key is kept in this tab only (sessionStorage)."));

// For tests and the curious: the live state, readable from the devtools console.
window.quantserveConsole = { chat, live, quant, models };
connect();
