// visrec's web page: drop images, see each one's prediction (and why, with Grad-CAM). No external resources.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { models: [], model: null, token: sessionStorage.getItem("visrec-token") || "" };

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

function setStatus(text) {
  $("#status").textContent = text;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) $("#auth").hidden = false;
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const hint = body && body.hint ? " (" + body.hint + ")" : "";
    const error = new Error(detail + hint);
    error.status = response.status;
    throw error;
  }
  return body;
}

function percent(p) {
  if (p > 0 && p < 0.001) return "<0.1%";
  return (100 * p).toFixed(p >= 0.9995 ? 0 : 1) + "%";
}

function showCard() {
  const m = state.model;
  const body = $("#card-body");
  body.replaceChildren();
  if (!m) return;
  const dl = el("dl");
  const metrics = Object.entries(m.test_metrics || {})
    .filter(([k]) => ["acc", "loc_acc", "miou", "map", "map50", "mask_map", "top5"].includes(k))
    .map(([k, v]) => k + " " + (v <= 1 ? percent(v) : v.toFixed(3))).join(", ");
  const rows = [["run", m.name], ["task", m.task], ["model", m.model], ["trained on", m.dataset],
                ["test", metrics || "not measured"]];
  if (m.input) rows.push(["input", m.input.width + "×" + m.input.height + ", " + m.input.channels + " channel(s)"]);
  if (m.classes) rows.push(["classes", m.classes.length + ": " + m.classes.join(", ")]);
  for (const [k, v] of rows) {
    dl.append(el("dt", {}, k), el("dd", {}, v));
  }
  body.append(dl);
}

async function loadModels() {
  try {
    const info = await api("/v1/models");
    state.models = info.models;
    const select = $("#model");
    select.replaceChildren(...info.models.map((m) => el("option", { value: m.name }, m.name + " (" + m.task + ")")));
    $("#model-picker").hidden = info.models.length < 2;
    state.model = info.models.find((m) => m.name === select.value) || info.models[0];
    showCard();
    if (!info.ready) {
      setStatus("The models are loading…");
      setTimeout(loadModels, 1000);
    } else {
      setStatus("");
    }
  } catch (e) {
    setStatus(e.status === 401 ? "Enter the server's access token." : "Cannot reach the server: " + e.message);
  }
}

function drawObjects(article, objects, width, height) {
  const svg = $(".boxes", article);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  const list = $(".objects", article);
  const size = Math.max(8, Math.round(width / 18));
  for (const o of objects) {
    const [x0, y0, x1, y1] = o.box;
    const ns = "http://www.w3.org/2000/svg";
    const rect = document.createElementNS(ns, "rect");
    for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: o.color || "#d00" })) {
      rect.setAttribute(k, v);
    }
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x0 + 2);
    label.setAttribute("y", Math.max(size, y0 - 2));
    label.setAttribute("font-size", size);
    label.setAttribute("fill", o.color || "#d00");
    label.textContent = o.class;
    svg.append(rect, label);
    const item = el("li");
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = o.color || "#d00";
    item.append(swatch, document.createTextNode(o.class + " " + percent(o.score)));
    list.append(item);
  }
  if (!objects.length) list.append(el("li", {}, "no object found"));
}

function drawPose(article, points, skeleton, width, height) {
  const svg = $(".boxes", article);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  const ns = "http://www.w3.org/2000/svg";
  const stroke = Math.max(0.5, width / 120);
  for (const [a, b] of skeleton) {
    const p = points[a - 1], q = points[b - 1];
    if (!p || !q) continue;
    const line = document.createElementNS(ns, "line");
    for (const [k, v] of Object.entries({ x1: p.x, y1: p.y, x2: q.x, y2: q.y, stroke: "#2ecc71",
                                          "stroke-width": stroke })) line.setAttribute(k, v);
    svg.append(line);
  }
  for (const p of points) {
    const dot = document.createElementNS(ns, "circle");
    const color = p.name.includes("left") ? "#e74c3c" : p.name.includes("right") ? "#3498db" : "#f1c40f";
    for (const [k, v] of Object.entries({ cx: p.x, cy: p.y, r: 2 * stroke, fill: color })) dot.setAttribute(k, v);
    const title = document.createElementNS(ns, "title");
    title.textContent = p.name + " " + percent(p.score);
    dot.append(title);
    svg.append(dot);
  }
  $(".objects", article).append(el("li", {}, points.length + " keypoints (left red, right blue)"));
}

function showAnswer(article, result, file) {
  const top = $(".top", article);
  if (result.top) {
    for (const t of result.top) {
      const li = el("li");
      li.append(el("span", { class: "cls" }, t.class), el("span", { class: "pct" }, percent(t.prob)),
                el("meter", { min: "0", max: "1", value: String(t.prob), "aria-label": t.class + " " + percent(t.prob) }));
      top.append(li);
    }
  }
  if (result.box) drawObjects(article, [{ class: result.top[0].class, box: result.box, score: result.top[0].prob,
                                          color: "#d00" }], result.width, result.height);
  if (result.objects) drawObjects(article, result.objects, result.width, result.height);
  if (result.caption !== undefined) {
    const item = el("li", { class: "caption" }, result.caption || "(no words)");
    if (result.attention) item.title = "attention over the image for each word: " +
      result.attention.map((a) => a.word).join(", ");
    top.append(item);
  }
  if (result.keypoints) drawPose(article, result.keypoints, result.skeleton || [], result.width, result.height);
  if (result.mask || result.stylized) {
    const overlay = $(".overlay", article);
    overlay.src = result.mask || result.stylized;
    overlay.alt = result.mask ? "predicted masks" : "the stylized image";
    overlay.hidden = false;
  }
  if (result.pixels) {
    const list = $(".objects", article);
    for (const [name, share] of Object.entries(result.pixels)) {
      const item = el("li");
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = (result.legend || {})[name] || "transparent";
      item.append(swatch, document.createTextNode(name + " " + percent(share) + " of the pixels"));
      list.append(item);
    }
  }
  if (state.model && (state.model.explain || []).includes("gradcam")) {
    const button = $(".cam", article);
    button.hidden = false;
    button.addEventListener("click", () => toggleCam(article, button, file));
  }
}

async function toggleCam(article, button, file) {
  // the button stays enabled (and focused) while the heat map loads: disabling it would drop keyboard focus
  if (button.getAttribute("aria-busy") === "true") return;
  const overlay = $(".overlay", article);
  const on = button.getAttribute("aria-pressed") !== "true";
  if (on && !overlay.dataset.loaded) {
    button.setAttribute("aria-busy", "true");
    try {
      const answer = await predict(file, true);
      overlay.src = answer.results[0].gradcam;
      overlay.alt = "Grad-CAM heat map of " + answer.results[0].top[0].class;
      overlay.dataset.loaded = "1";
    } catch (e) {
      const error = $(".error", article);
      error.textContent = e.message;
      error.hidden = false;
      return;
    } finally {
      button.removeAttribute("aria-busy");
    }
  }
  overlay.hidden = !on;
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "Hide Grad-CAM" : "Show Grad-CAM";
}

async function predict(file, explain) {
  const params = new URLSearchParams({ top_k: "5" });
  if (explain) params.set("explain", "gradcam");
  if (state.model) params.set("model", state.model.name);
  const form = new FormData();
  form.append("images", file, file.name);
  return api("/v1/predict?" + params.toString(), { method: "POST", body: form });
}

async function handleFiles(files) {
  const images = Array.from(files);
  if (!images.length) return;
  setStatus("Predicting " + images.length + " image" + (images.length > 1 ? "s" : "") + "…");
  const results = $("#results");
  let done = 0;
  await Promise.all(images.map(async (file) => {
    const article = $("#result").content.firstElementChild.cloneNode(true);
    const photo = $(".photo", article);
    photo.src = URL.createObjectURL(file);
    photo.alt = file.name;
    $(".name", article).textContent = file.name;
    results.prepend(article);
    try {
      const answer = await predict(file, false);
      showAnswer(article, answer.results[0], file);
      article.dataset.state = "done";
    } catch (e) {
      const error = $(".error", article);
      error.textContent = e.message;
      error.hidden = false;
      article.dataset.state = "error";
    }
    done += 1;
    setStatus(done + " of " + images.length + " done");
  }));
}

function setup() {
  const drop = $("#drop");
  const input = $("#files");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { handleFiles(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    handleFiles(e.dataTransfer.files);
  });
  $("#model").addEventListener("change", (e) => {
    state.model = state.models.find((m) => m.name === e.target.value);
    showCard();
  });
  $("#auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("#token").value;
    sessionStorage.setItem("visrec-token", state.token);
    $("#auth").hidden = true;
    loadModels();
  });
  loadModels();
}

setup();
