// The try-it page: lists the served models (/v1/models), shows the chosen one's metadata
// (/v2/models/{name}) and sends each picked, dropped or pasted image, each drawing made on the pad and
// each sample clicked to /v1/models/{name}/classify.
// Plain JavaScript, no framework, nothing loaded from elsewhere. URLs are relative, so the page also
// works behind a proxy that serves the API under a path prefix.
"use strict";

const TOP_K = 5;
// Kept for the browser tab's session only (sessionStorage), so that a reload keeps them.
const KEY_STORE = "stageformer.apiKey";
const MODEL_STORE = "stageformer.model";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  keyForm: $("key-form"),
  key: $("api-key"),
  notice: $("notice"),
  info: $("model-info"),
  drop: $("drop"),
  files: $("files"),
  endpoint: $("endpoint"),
  results: $("results"),
  resultsHead: $("results-head"),
  clear: $("clear"),
  template: $("result-template"),
  pad: $("pad"),
  padSend: $("pad-send"),
  padClear: $("pad-clear"),
  samples: $("samples"),
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// fetch with the API key, if one was typed; a non-2xx answer becomes an ApiError carrying the API's
// own message ({"error": "..."}), or the status line when the body is not the API's JSON.
async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = ui.key.value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message}); is it still running?`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

function showNotice(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
}

const percent = (p) => (p < 0.0005 ? "<0.1%" : `${(100 * p).toFixed(1)}%`);

function describeList(items, limit = 12) {
  const shown = items.slice(0, limit).join(", ");
  return items.length > limit ? `${shown}, … (${items.length - limit} more)` : shown;
}

// --- models and their metadata -----------------------------------------------------------------

async function loadModels() {
  ui.model.disabled = true;
  try {
    const list = await api("v1/models");
    const previous = sessionStorage.getItem(MODEL_STORE);
    ui.model.replaceChildren(
      ...list.models.map((name) => new Option(name === list.default ? `${name} (default)` : name, name)),
    );
    ui.model.value = list.models.includes(previous) ? previous : list.default;
    ui.model.disabled = false;
    showNotice("");
    ui.key.removeAttribute("aria-invalid");
  } catch (err) {
    ui.model.replaceChildren(new Option("—", ""));
    ui.info.hidden = true;
    if (err.status === 401) {
      ui.key.setAttribute("aria-invalid", "true");
      ui.key.focus();
      showNotice(`${err.message}. Type the server's API key above.`);
    } else {
      showNotice(err.message);
    }
    return;
  }
  await loadMetadata().catch((err) => showNotice(err.message));
}

async function loadMetadata() {
  const name = ui.model.value;
  ui.endpoint.textContent = `/v1/models/${name}/classify`;
  const meta = await api(`v2/models/${encodeURIComponent(name)}`);
  const params = meta.parameters || {};
  const pre = params.preprocess || {};
  const input = meta.inputs[0];
  const size = pre.image_size;
  $("model-name").textContent = meta.name;
  $("meta-input").textContent =
    `${size}×${size} RGB · ${input.name}: ${input.datatype} [${input.shape.map((d) => (d < 0 ? "batch" : d)).join(", ")}]`;
  const parts = [`${pre.interpolation} resize`, `centre crop ${+(100 * pre.crop_pct).toFixed(1)}%`];
  if (pre.mean) parts.push(`mean ${pre.mean.map((v) => +v.toFixed(3)).join("/")}`);
  if (pre.std) parts.push(`std ${pre.std.map((v) => +v.toFixed(3)).join("/")}`);
  $("meta-preprocess").textContent = parts.join(" · ");
  const labels = params.labels || [];
  $("meta-classes").textContent = `${labels.length}: ${describeList(labels)}`;
  $("meta-provider").textContent = params.provider || "unknown";
  const chosen = params.max_batch_size_measured ? " (the fastest size, measured when the model loaded)" : "";
  $("meta-batching").textContent =
    `up to ${params.max_batch_size} images per run${chosen}, waiting at most ${params.max_queue_delay_ms} ms ` +
    "for more while other requests are on their way" +
    (params.lanes ? `; ${params.lanes} runs side by side while requests queue` : "");
  ui.info.hidden = false;
}

// --- classifying ---------------------------------------------------------------------------------

function addCard(file) {
  const card = ui.template.content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = file.name || "pasted image";
  const img = card.querySelector("img");
  const url = URL.createObjectURL(file);
  img.addEventListener("error", () => card.querySelector(".thumb").classList.add("broken"), { once: true });
  img.src = url;
  img.alt = file.name || "image";
  card.dataset.url = url;
  ui.results.prepend(card);
  ui.resultsHead.hidden = false;
  return card;
}

function showPredictions(card, predictions) {
  const list = card.querySelector(".predictions");
  list.replaceChildren(
    ...predictions.map((p, i) => {
      const item = document.createElement("li");
      if (i === 0) item.className = "best";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label;
      label.title = `class ${p.index}`;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0, Math.min(100, 100 * p.score))}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = percent(p.score);
      item.append(label, bar, score);
      return item;
    }),
  );
}

async function classify(file, model) {
  const card = addCard(file);
  card.querySelector(".model").textContent = model;
  const latency = card.querySelector(".latency");
  const form = new FormData();
  form.append("file", file, file.name || "image");
  const path = `v1/models/${encodeURIComponent(model)}/classify?top_k=${TOP_K}`;
  const started = performance.now();
  try {
    const body = await api(path, { method: "POST", body: form });
    const ms = performance.now() - started;
    showPredictions(card, body.results[0].predictions);
    card.classList.replace("pending", "done");
    latency.textContent = `${ms.toFixed(0)} ms`;
    latency.title = "round trip: upload, decoding, queueing, inference, answer";
  } catch (err) {
    const ms = performance.now() - started;
    const error = card.querySelector(".error");
    error.textContent = err.message;
    error.hidden = false;
    card.classList.replace("pending", "failed");
    latency.textContent = err.status ? `HTTP ${err.status} · ${ms.toFixed(0)} ms` : "no answer";
  }
}

function classifyAll(files) {
  const model = ui.model.value;
  if (!model) {
    showNotice("No model to send the images to; see the message above, or reload the page.");
    return;
  }
  for (const file of files) classify(file, model);
}

// --- the drawing pad -----------------------------------------------------------------------------
// Dark ink on white paper, round pen; the line is 1/16 of the pad wide, about a felt pen on a small
// sheet. Pointer events cover the mouse, pens and touch alike.

const PAD_INK = "#111";
const PAD_PAPER = "#fff";
const pad = {
  context: ui.pad.getContext("2d"),
  pointer: null, // the pointer drawing now, if any
  last: null, // its previous point on the pad
  drawn: false,
  sent: 0, // drawings sent so far, to name them
};

function clearPad() {
  const { context } = pad;
  context.fillStyle = PAD_PAPER;
  context.fillRect(0, 0, ui.pad.width, ui.pad.height);
  pad.drawn = false;
  ui.padSend.disabled = true;
  ui.padClear.disabled = true;
}

// A pointer event's position in the pad's own pixels, whatever size the page shows it at.
function padPoint(event) {
  const box = ui.pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * ui.pad.width) / box.width,
    y: ((event.clientY - box.top) * ui.pad.height) / box.height,
  };
}

function inkTo(point) {
  const { context } = pad;
  context.strokeStyle = PAD_INK;
  context.fillStyle = PAD_INK;
  context.lineWidth = ui.pad.width / 16;
  context.lineCap = "round";
  context.lineJoin = "round";
  if (pad.last) {
    context.beginPath();
    context.moveTo(pad.last.x, pad.last.y);
    context.lineTo(point.x, point.y);
    context.stroke();
  } else {
    context.beginPath();
    context.arc(point.x, point.y, context.lineWidth / 2, 0, 2 * Math.PI);
    context.fill();
  }
  pad.last = point;
  if (!pad.drawn) {
    pad.drawn = true;
    ui.padSend.disabled = false;
    ui.padClear.disabled = false;
  }
}

ui.pad.addEventListener("pointerdown", (event) => {
  if (pad.pointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
  event.preventDefault();
  try {
    ui.pad.setPointerCapture(event.pointerId); // keep the stroke when the pointer leaves the pad
  } catch {
    // a pointer the browser no longer tracks: draw without capture
  }
  pad.pointer = event.pointerId;
  pad.last = null;
  inkTo(padPoint(event));
});
ui.pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== pad.pointer) return;
  event.preventDefault();
  // Fast strokes deliver several positions per event; drawing them all keeps curves round.
  const events = typeof event.getCoalescedEvents === "function" ? event.getCoalescedEvents() : [];
  for (const each of events.length ? events : [event]) inkTo(padPoint(each));
});
for (const type of ["pointerup", "pointercancel"]) {
  ui.pad.addEventListener(type, (event) => {
    if (event.pointerId !== pad.pointer) return;
    pad.pointer = null;
    pad.last = null;
  });
}

ui.padClear.addEventListener("click", clearPad);
ui.padSend.addEventListener("click", () => {
  if (!pad.drawn) return;
  ui.pad.toBlob((blob) => {
    if (!blob) {
      showNotice("The browser could not turn the drawing into a PNG.");
      return;
    }
    pad.sent += 1;
    classifyAll([new File([blob], `drawing-${pad.sent}.png`, { type: "image/png" })]);
  }, "image/png");
});

// --- samples built into the page (static/samples.js) --------------------------------------------

function sampleFile(sample) {
  const bytes = Uint8Array.from(atob(sample.data), (c) => c.charCodeAt(0));
  return new File([bytes], sample.name, { type: sample.type });
}

function showSamples() {
  const samples = window.STAGEFORMER_SAMPLES || [];
  ui.samples.replaceChildren(
    ...samples.map((sample) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sample";
      button.dataset.name = sample.name;
      button.title = `${sample.description}: send it to the model`;
      const img = document.createElement("img");
      img.src = `data:${sample.type};base64,${sample.data}`;
      img.alt = sample.description;
      const caption = document.createElement("span");
      caption.textContent = sample.description;
      button.append(img, caption);
      button.addEventListener("click", () => classifyAll([sampleFile(sample)]));
      return button;
    }),
  );
}

// --- wiring --------------------------------------------------------------------------------------

ui.files.addEventListener("change", () => {
  classifyAll([...ui.files.files]);
  ui.files.value = ""; // picking the same file again fires "change" again
});

for (const type of ["dragenter", "dragover"]) {
  ui.drop.addEventListener(type, (event) => {
    event.preventDefault();
    ui.drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  ui.drop.addEventListener(type, () => ui.drop.classList.remove("over"));
}
ui.drop.addEventListener("drop", (event) => {
  event.preventDefault();
  classifyAll([...event.dataTransfer.files]);
});
// A file dropped beside the drop zone would make the browser leave the page to open it.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])];
  if (files.length) classifyAll(files);
});

ui.model.addEventListener("change", () => {
  sessionStorage.setItem(MODEL_STORE, ui.model.value);
  loadMetadata().catch((err) => showNotice(err.message));
});

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.key.value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  loadModels();
});

ui.clear.addEventListener("click", () => {
  for (const card of ui.results.children) URL.revokeObjectURL(card.dataset.url);
  ui.results.replaceChildren();
  ui.resultsHead.hidden = true;
});

ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
clearPad();
showSamples();
loadModels();
