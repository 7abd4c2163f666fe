// The console's entry point: finds the models (asking for the API key when the server answers
// 401), then runs the chat playground, the live charts and the quantization report.

import { apiKey, getJSON, setApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { Live } from "./live.js";
import { QuantReport } from "./quant.js";

const $ = (id) => document.getElementById(id);
let cards = []; // /v1/models' data: the served models, and LoRA adapters with their base as `parent`
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

const chat = new Chat({ model: selectedModel, onAuthError: askForKey });
const live = new Live({ model: selectedBase, onAuthError: askForKey, onStatus: status, onRecover: () => connect() });
const quant = new QuantReport({ onAuthError: askForKey });
let retry = null;

async function connect() {
  clearTimeout(retry);
  let models;
  try {
    models = await getJSON("/v1/models");
  } catch (err) {
    if (err.status === 401) return askForKey(err);
    // 503 while the model loads; anything else (server restarting) is retried too.
    status(err.status === 503 ? err.message : `cannot reach the server: ${err.message}`, true);
    retry = setTimeout(connect, err.status === 503 ? 2000 : 5000);
    return;
  }
  $("key-form").hidden = true;
  const picker = $("model");
  const previous = picker.value;
  cards = models.data;
  picker.replaceChildren(...cards.map((card) => {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.parent ? `${card.id} (LoRA adapter on ${card.parent})` : card.id;
    return option;
  }));
  if (cards.some((c) => c.id === previous)) picker.value = previous;
  const card = cards.find((c) => c.id === picker.value);
  status(card ? `ready · context ${card.max_model_len ?? "?"} tokens` : "no model served", !card);
  live.start();
  if (card) quant.load(selectedBase());
}

$("model").addEventListener("change", () => {
  live.previous = null;
  quant.load(selectedBase());
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("key-input").value.trim());
  connect();
});
$("key-button").addEventListener("click", () => showKeyForm("The key is kept in this tab only (sessionStorage)."));

// For tests and the curious: the live state, readable from the devtools console.
window.quantserveConsole = { chat, live, quant };
connect();
