// imagegen playground: plain JavaScript over the server's own OpenAI-compatible API (no libraries).
"use strict";

const $ = (id) => document.getElementById(id);
const API = new URL("v1/", document.baseURI);
const KEY_STORAGE = "imagegen.apiKey";
// How often a busy server (429) is asked again, each time after its Retry-After, before giving up.
const MAX_BUSY_RETRIES = 60;
const SNIPPET_FILE = "image.png";

const state = {
  mode: "generate",
  models: [],
  running: null, // the AbortController of the request in flight
  image: null, // the Blob to edit
  painted: false,
};

// -- talking to the server ------------------------------------------------------------------------
class ApiError extends Error {}

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not an OpenAI error body
  }
  return `The server answered ${response.status} ${response.statusText}.`;
}

async function call(path, options = {}) {
  try {
    return await fetch(new URL(path, API), options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`Could not reach the server (${error.message}).`);
  }
}

function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  const seconds = Number(value);
  if (value !== null && Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isFinite(date) ? Math.max(0, (date - Date.now()) / 1000) : 1;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("cancelled", "AbortError"));
    });
  });
}

// POST, asking again after Retry-After while the server is busy; a non-2xx answer raises its message.
async function post(path, makeBody, contentType, signal) {
  for (let attempt = 1; ; attempt++) {
    const headers = authHeaders(contentType ? { "Content-Type": contentType } : {});
    const response = await call(path, { method: "POST", headers, body: makeBody(), signal });
    if (response.status === 429 && attempt <= MAX_BUSY_RETRIES) {
      const wait = retryAfterSeconds(response);
      setStatus(`Server busy, retrying in ${wait} s (attempt ${attempt} of ${MAX_BUSY_RETRIES})…`);
      await sleep(wait * 1000, signal);
      continue;
    }
    if (!response.ok) throw new ApiError(await errorMessage(response));
    return response;
  }
}

// The JSON data of each server-sent event of a streamed answer.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// -- models and sizes -----------------------------------------------------------------------------
async function loadModels() {
  showError("");
  try {
    const response = await call("models", { headers: authHeaders() });
    if (!response.ok) {
      showError(await errorMessage(response));
      if (response.status === 401) $("api-key").focus();
      return;
    }
    state.models = (await response.json()).data;
  } catch (error) {
    showError(error.message);
    return;
  }
  const select = $("model");
  const previous = select.value;
  // With several models, each says whether it is loaded (a request for an unloaded one loads it first).
  const label = (card) => (card.status && card.status !== "loaded" && !card.parent ? `${card.id} (${card.status})` : card.id);
  select.replaceChildren(...state.models.map((card) => new Option(label(card), card.id)));
  if (state.models.some((card) => card.id === previous)) select.value = previous;
  applyModel();
}

function currentModel() {
  return state.models.find((card) => card.id === $("model").value);
}

function applyModel() {
  const card = currentModel();
  if (!card) return;
  const size = $("size");
  const previous = size.value;
  // A model not loaded yet may not know its default size (null: its native size).
  const sizes = [...new Set([card.default_size, ...card.allowed_sizes])].filter(Boolean);
  size.replaceChildren(
    ...sizes.map((s) => new Option(s, s)),
    new Option("auto", "auto"), // the model's size, or the image's when editing
    new Option("other…", "other"),
  );
  size.value = [...sizes, "auto", "other"].includes(previous) ? previous : card.default_size || "auto";
  const steps = $("steps");
  steps.max = card.max_num_inference_steps;
  if (!steps.dataset.touched) steps.value = card.default_num_inference_steps;
  const canEdit = card.tasks.includes("img2img");
  $("tab-edit").disabled = !canEdit;
  $("tab-edit").title = canEdit ? "" : `${card.id} cannot edit images`;
  if (!canEdit && state.mode === "edit") setMode("generate");
  showCustomSize();
}

function showCustomSize() {
  $("custom-size").hidden = $("size").value !== "other";
}

// -- the request ----------------------------------------------------------------------------------
function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// The fields of one request, as the API names them (extensions included), without stream options.
function requestFields() {
  const fields = { model: $("model").value || undefined, prompt: $("prompt").value };
  const size = $("size").value === "other" ? $("custom-size").value.trim() : $("size").value;
  if (size) fields.size = size;
  fields.n = number("n");
  const negative = $("negative-prompt").value.trim();
  if (negative) fields.negative_prompt = negative;
  fields.num_inference_steps = number("steps");
  fields.guidance_scale = number("guidance");
  fields.seed = number("seed");
  if (state.mode === "edit") fields.strength = Number($("strength").value);
  for (const name of Object.keys(fields)) if (fields[name] === undefined) delete fields[name];
  return fields;
}

async function run() {
  if (state.running) return;
  showError("");
  if (!$("prompt").value.trim()) {
    showError("Write a prompt first.");
    $("prompt").focus();
    return;
  }
  const editing = state.mode === "edit";
  if (editing && !state.image) {
    showError("Choose an image to edit first.");
    $("image-file").focus();
    return;
  }
  const fields = requestFields();
  const streamed = { ...fields, stream: true, progress: true, partial_images: number("partial-images") ?? 0 };
  const controller = new AbortController();
  state.running = controller;
  setBusy(true);
  const started = performance.now();
  let batch = null;
  try {
    let response;
    if (editing) {
      const mask = state.painted ? await maskBlob() : null;
      const form = () => {
        const data = new FormData();
        data.append("image", state.image, "image.png");
        if (mask) data.append("mask", mask, "mask.png");
        for (const [name, value] of Object.entries(streamed)) data.append(name, String(value));
        return data;
      };
      response = await post("images/edits", form, null, controller.signal);
    } else {
      response = await post("images/generations", () => JSON.stringify(streamed), "application/json", controller.signal);
    }
    setStatus("Queued…");
    batch = new Batch(fields.n ?? 1, { ...fields, edit: editing, masked: state.painted });
    const done = await batch.read(response);
    setStatus(`Done: ${done} image${done === 1 ? "" : "s"} in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  } catch (error) {
    if (batch) batch.dropUnfinished();
    if (error.name === "AbortError") {
      setStatus("Cancelled.");
    } else {
      setStatus("");
      showError(error.message);
    }
  } finally {
    state.running = null;
    setBusy(false);
  }
}

// The cards of one request's images: previews while it denoises, then the results.
class Batch {
  constructor(n, fields) {
    this.fields = fields;
    this.element = document.createElement("div");
    this.element.className = "batch";
    this.cards = Array.from({ length: n }, () => new Card(fields));
    this.element.append(...this.cards.map((card) => card.element));
    this.partialsSeen = {}; // partial_image_index -> how many images have sent it
    this.completed = 0;
    $("results").prepend(this.element);
    $("empty").hidden = true;
  }

  async read(response) {
    for await (const event of serverSentEvents(response)) {
      if (event.type === "error") throw new ApiError(event.error.message);
      const kind = event.type.split(".").pop();
      if (kind === "progress") {
        $("progress").max = event.total_steps;
        $("progress").value = event.step;
        const loading = event.stage === "loading_model";
        setStatus(loading ? "Loading the model…" : `Step ${event.step} of ${event.total_steps}`);
      } else if (kind === "partial_image") {
        // With n images, each partial image index comes once per image, in image order.
        const seen = this.partialsSeen[event.partial_image_index] ?? 0;
        this.partialsSeen[event.partial_image_index] = seen + 1;
        this.cards[seen % this.cards.length].showPreview(event);
      } else if (kind === "completed") {
        this.cards[this.completed++].showResult(event);
      }
    }
    if (this.completed < this.cards.length) throw new ApiError("The stream ended before every image was done.");
    return this.completed;
  }

  dropUnfinished() {
    for (const card of this.cards) if (!card.done) card.element.remove();
    if (!this.element.children.length) this.element.remove();
    $("empty").hidden = $("results").children.length > 0;
  }
}

function dataUrl(event) {
  return `data:image/${event.output_format};base64,${event.b64_json}`;
}

class Card {
  constructor(fields) {
    this.fields = fields;
    this.done = false;
    this.element = document.createElement("article");
    this.element.className = "card";
    this.image = document.createElement("img");
    this.image.alt = "";
    this.image.hidden = true;
    this.meta = document.createElement("div");
    this.meta.className = "meta";
    this.meta.textContent = "Waiting…";
    this.element.append(this.image, this.meta);
  }

  showPreview(event) {
    this.image.className = "preview";
    this.image.src = dataUrl(event);
    this.image.alt = `Preview ${event.partial_image_index + 1} of: ${this.fields.prompt}`;
    this.image.hidden = false;
    this.meta.textContent = `Preview ${event.partial_image_index + 1}…`;
  }

  showResult(event) {
    const seed = event.seed;
    const url = dataUrl(event);
    this.done = true;
    this.image.className = "result";
    this.image.src = url;
    this.image.dataset.seed = seed;
    this.image.alt = `${this.fields.prompt} (seed ${seed})`;
    this.image.hidden = false;
    this.meta.textContent = `seed ${seed} · ${event.size}`;
    const snippets = { ...this.fields, seed, n: undefined };
    const curl = curlSnippet(snippets);
    const python = pythonSnippet(snippets);
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    buttons.append(
      button("Reuse seed", "reuse-seed", () => {
        $("seed").value = seed;
        $("prompt").focus();
      }),
      link("Download", "download", url, `imagegen-${seed}.${event.output_format}`),
      button("Copy as curl", "copy-curl", (target) => copy(curl, target)),
      button("Copy as Python (openai)", "copy-python", (target) => copy(python, target)),
    );
    if (currentModel() && currentModel().tasks.includes("img2img")) {
      buttons.append(button("Edit", "edit-result", () => editResult(url)));
    }
    const code = document.createElement("details");
    code.innerHTML = "<summary>Code</summary>";
    code.append(pre("curl", curl), pre("python", python));
    this.element.append(buttons, code);
  }
}

function button(text, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  element.addEventListener("click", () => onClick(element));
  return element;
}

function link(text, className, href, filename) {
  const element = document.createElement("a");
  element.className = className;
  element.textContent = text;
  element.href = href;
  element.download = filename;
  return element;
}

function pre(className, text) {
  const element = document.createElement("pre");
  element.className = className;
  element.textContent = text;
  return element;
}

async function copy(text, target) {
  const label = target.textContent;
  try {
    await navigator.clipboard.writeText(text);
    target.textContent = "Copied";
  } catch (_) {
    // No clipboard outside a secure context (plain http to another host): the code is shown instead.
    target.closest(".card").querySelector("details").open = true;
    target.textContent = "See the code below";
  }
  setTimeout(() => (target.textContent = label), 1500);
}

// -- code snippets that make the same image -------------------------------------------------------
const EXTENSIONS = ["negative_prompt", "num_inference_steps", "guidance_scale", "seed", "strength"];

function shellQuote(text) {
  return `'${String(text).replace(/'/g, `'\\''`)}'`;
}

const SAVE_FIRST_IMAGE =
  `python3 -c 'import sys, json, base64; open("${SNIPPET_FILE}", "wb").write(` +
  `base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'`;

function curlSnippet(fields) {
  const auth = $("api-key").value.trim() ? [`-H "Authorization: Bearer $OPENAI_API_KEY"`] : [];
  const { edit, masked, ...body } = fields;
  let lines;
  if (edit) {
    const parts = ["-F image=@input.png", ...(masked ? ["-F mask=@mask.png"] : [])];
    for (const [name, value] of Object.entries(body)) {
      if (value !== undefined) parts.push(`--form-string ${shellQuote(`${name}=${value}`)}`);
    }
    lines = [`curl -s ${API}images/edits`, ...auth, ...parts];
  } else {
    const json = JSON.stringify(Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined)));
    lines = [`curl -s ${API}images/generations`, `-H 'Content-Type: application/json'`, ...auth, `-d ${shellQuote(json)}`];
  }
  return `${lines.join(" \\\n  ")} \\\n  | ${SAVE_FIRST_IMAGE}`;
}

function pythonSnippet(fields) {
  const { edit, masked, ...body } = fields;
  const args = [];
  if (body.model) args.push(`model=${JSON.stringify(body.model)}`);
  if (edit) {
    args.push(`image=open("input.png", "rb")`);
    if (masked) args.push(`mask=open("mask.png", "rb")`);
  }
  args.push(`prompt=${JSON.stringify(body.prompt)}`);
  if (body.size) args.push(`size=${JSON.stringify(body.size)}`);
  // JSON strings and numbers are Python literals too.
  const extra = EXTENSIONS.filter((name) => body[name] !== undefined).map(
    (name) => `${JSON.stringify(name)}: ${JSON.stringify(body[name])}`,
  );
  args.push(`extra_body={${extra.join(", ")}}`);
  const client = $("api-key").value.trim()
    ? `client = OpenAI(base_url="${API.href.replace(/\/$/, "")}")  # the key from OPENAI_API_KEY`
    : `client = OpenAI(base_url="${API.href.replace(/\/$/, "")}", api_key="unused")`;
  return [
    "import base64",
    "from openai import OpenAI",
    "",
    client,
    `response = client.images.${edit ? "edit" : "generate"}(`,
    ...args.map((arg) => `    ${arg},`),
    ")",
    `open("${SNIPPET_FILE}", "wb").write(base64.b64decode(response.data[0].b64_json))`,
  ].join("\n");
}

// -- editing: the image and its mask --------------------------------------------------------------
const painting = { active: false, last: null };

async function setImage(blob) {
  const bitmap = await createImageBitmap(blob);
  const imageCanvas = $("image-canvas");
  const maskCanvas = $("mask-canvas");
  imageCanvas.width = maskCanvas.width = bitmap.width;
  imageCanvas.height = maskCanvas.height = bitmap.height;
  imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  state.image = blob;
  clearMask();
  $("canvas-frame").hidden = false;
  $("size").value = "auto";
  showCustomSize();
}

async function editResult(url) {
  const blob = await (await fetch(url)).blob();
  setMode("edit");
  await setImage(blob);
  $("prompt").focus();
  window.scrollTo({ top: 0 });
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.painted = false;
}

function paintAt(event) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width; // the canvas has the image's own pixels
  const point = { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale };
  const context = canvas.getContext("2d");
  const width = Number($("brush-size").value) * scale;
  context.strokeStyle = context.fillStyle = "#ff00ff"; // shown at half opacity over the image
  context.lineWidth = width;
  context.lineCap = "round";
  context.beginPath();
  if (painting.last) {
    context.moveTo(painting.last.x, painting.last.y);
    context.lineTo(point.x, point.y);
    context.stroke();
  } else {
    context.arc(point.x, point.y, width / 2, 0, 2 * Math.PI);
    context.fill();
  }
  painting.last = point;
  state.painted = true;
}

// OpenAI's mask: the image's size, fully transparent where painted (repaint), opaque elsewhere (keep).
function maskBlob() {
  const source = $("mask-canvas");
  const { width, height } = source;
  const painted = source.getContext("2d").getImageData(0, 0, width, height).data;
  const mask = new ImageData(width, height);
  for (let i = 3; i < painted.length; i += 4) mask.data[i] = painted[i] > 0 ? 0 : 255;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// -- the page -------------------------------------------------------------------------------------
function setMode(mode) {
  state.mode = mode;
  $("tab-generate").setAttribute("aria-selected", String(mode === "generate"));
  $("tab-edit").setAttribute("aria-selected", String(mode === "edit"));
  $("edit-fields").hidden = mode !== "edit";
  $("generate").textContent = mode === "edit" ? "Edit" : "Generate";
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  const progress = $("progress");
  progress.hidden = !busy;
  progress.removeAttribute("value"); // indeterminate until the first step
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// On Enter and when the field loses focus: a new key is kept in this browser and the models are loaded with it.
function saveKey() {
  const key = $("api-key").value.trim();
  if (key === (localStorage.getItem(KEY_STORAGE) ?? "")) return;
  localStorage.setItem(KEY_STORAGE, key);
  loadModels();
}

function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", saveKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey();
  });
  $("model").addEventListener("change", applyModel);
  $("size").addEventListener("change", showCustomSize);
  $("steps").addEventListener("input", () => ($("steps").dataset.touched = "1"));
  $("strength").addEventListener("input", () => ($("strength-value").value = $("strength").value));
  $("tab-generate").addEventListener("click", () => setMode("generate"));
  $("tab-edit").addEventListener("click", () => setMode("edit"));
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  $("cancel").addEventListener("click", () => state.running && state.running.abort());
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      run();
    } else if (event.key === "Escape" && state.running) {
      state.running.abort();
    }
  });
  $("image-file").addEventListener("change", () => {
    const file = $("image-file").files[0];
    if (file) setImage(file).catch(() => showError(`${file.name} could not be read as an image.`));
  });
  $("clear-mask").addEventListener("click", clearMask);
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (event) => {
    painting.active = true;
    painting.last = null;
    mask.setPointerCapture(event.pointerId);
    paintAt(event);
  });
  mask.addEventListener("pointermove", (event) => painting.active && paintAt(event));
  for (const type of ["pointerup", "pointercancel"]) {
    mask.addEventListener(type, () => {
      painting.active = false;
      painting.last = null;
    });
  }
  loadModels();
}

start();
