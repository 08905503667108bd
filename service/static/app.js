// unet-tile's page: drop TIFFs, follow their jobs, look at the result. No libraries, nothing from
// the internet: every request goes to this server (/jobs, /model), with the API key when one is given.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "unet-tile.api-key"; // kept in sessionStorage: gone when the tab closes
const POLL_MS = 400;

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

// --- the model line -------------------------------------------------------------------------
async function showModel() {
  try {
    const m = await (await api("/model")).json();
    const classes = (m.class_names || []).join(", ");
    $("model").textContent = `Model ${String(m.sha256 || "").slice(0, 12)} · ${classes} · ${m.device} ${m.precision}`;
    $("model").classList.remove("bad");
  } catch (e) {
    $("model").textContent = e.message;
  }
}

// --- jobs -----------------------------------------------------------------------------------
const jobs = []; // {file, li, record, preview}

function upload(file, item) {
  // XMLHttpRequest: fetch has no upload progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const output = $("output").value;
    xhr.open("POST", `/jobs?output=${encodeURIComponent(output)}`);
    for (const [k, v] of Object.entries(headers({ "Content-Type": "image/tiff" }))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setProgress(item, "upload", e.loaded / e.total, `uploading ${pct(e.loaded / e.total)}`);
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 202 && body) resolve(body);
      else {
        const detail = body && typeof body.detail === "string" ? body.detail : `${xhr.status} ${xhr.statusText}`;
        reject(new ApiError(xhr.status, detail));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "the server could not be reached"));
    xhr.send(file);
  });
}

function pct(f) { return `${Math.round(100 * f)} %`; }

function setProgress(item, which, fraction, text) {
  const bar = item.li.querySelector(`progress.${which}`);
  bar.value = fraction;
  item.li.querySelector(".state").textContent = text;
}

function card(file) {
  const li = document.createElement("li");
  li.innerHTML = `<div class="name"></div>
    <label>Upload <progress class="upload" max="1" value="0"></progress></label>
    <label>Segmentation <progress class="segment" max="1" value="0"></progress></label>
    <div class="state" aria-live="polite">waiting</div>
    <div class="error" role="alert"></div>
    <button type="button" class="view" hidden>View</button>`;
  li.querySelector(".name").textContent = file.name;
  $("jobs").appendChild(li);
  return li;
}

async function submit(files) {
  $("notice").textContent = "";
  const items = [...files].map((file) => {
    const item = { file, li: card(file), record: null, preview: null };
    jobs.push(item);
    return item;
  });
  for (const item of items) await run(item); // one at a time: the server runs jobs one after another anyway
}

async function run(item) {
  const fail = (message) => {
    item.li.querySelector(".error").textContent = message;
    item.li.querySelector(".state").textContent = "failed";
    item.li.dataset.state = "failed";
  };
  let record;
  try {
    record = await upload(item.file, item);
  } catch (e) {
    fail(e.message);
    return;
  }
  setProgress(item, "upload", 1, "queued");
  item.li.dataset.job = record.id;
  while (record.state === "queued" || record.state === "running") {
    await new Promise((r) => setTimeout(r, POLL_MS));
    try {
      record = await (await api(record.url)).json();
    } catch (e) {
      fail(e.message);
      return;
    }
    const p = record.progress;
    const eta = record.eta_s != null && record.state === "running" ? `, about ${Math.ceil(record.eta_s)} s left` : "";
    setProgress(item, "segment", p.fraction, `${record.state}: ${p.tiles_done}/${p.tiles_total} tiles${eta}`);
  }
  item.record = record;
  if (record.state !== "done") {
    fail(record.error || `job ${record.state}`);
    return;
  }
  const objects = record.objects != null ? ` · ${record.objects} objects` : "";
  setProgress(item, "segment", 1, `done in ${record.elapsed_s} s${objects}`);
  item.li.dataset.state = "done";
  const view = item.li.querySelector(".view");
  view.hidden = false;
  view.onclick = () => open(item);
  await open(item);
}

// --- the viewer -----------------------------------------------------------------------------
class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.cache = new Map(); // url -> {bitmap, promise, used}
    this.inflight = 0;
    this.queue = [];
    this.meta = null;
    this.scale = 1; // screen pixels per image pixel
    this.x = 0; // image coordinates at the canvas's top-left corner
    this.y = 0;
    this.pending = false;
    this.bindInput();
    new ResizeObserver(() => this.resize()).observe(canvas);
  }

  show(meta) {
    this.meta = meta;
    this.cache.clear();
    this.queue = [];
    this.canvas.dataset.state = "loading";
    this.resize();
    this.fit();
  }

  resize() {
    const r = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(r.width * dpr));
    this.canvas.height = Math.max(1, Math.round(r.height * dpr));
    this.redraw();
  }

  fit() {
    if (!this.meta) return;
    const { width, height } = this.meta;
    this.scale = Math.min(this.canvas.width / width, this.canvas.height / height);
    this.x = (width - this.canvas.width / this.scale) / 2;
    this.y = (height - this.canvas.height / this.scale) / 2;
    this.redraw();
  }

  zoom(factor, cx = this.canvas.width / 2, cy = this.canvas.height / 2) {
    const ix = this.x + cx / this.scale, iy = this.y + cy / this.scale;
    this.scale = Math.min(32, Math.max(1 / 4096, this.scale * factor));
    this.x = ix - cx / this.scale;
    this.y = iy - cy / this.scale;
    this.redraw();
  }

  pan(dx, dy) {
    this.x -= dx / this.scale;
    this.y -= dy / this.scale;
    this.redraw();
  }

  bindInput() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY }; c.setPointerCapture(e.pointerId); });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dpr = window.devicePixelRatio || 1;
      this.pan((e.clientX - drag.x) * dpr, (e.clientY - drag.y) * dpr);
      drag = { x: e.clientX, y: e.clientY };
    });
    c.addEventListener("pointerup", () => { drag = null; });
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = c.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
      this.zoom(Math.pow(2, -e.deltaY / 300), (e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr);
    }, { passive: false });
    c.addEventListener("keydown", (e) => {
      const step = 80;
      const keys = {
        "+": () => this.zoom(1.5), "=": () => this.zoom(1.5), "-": () => this.zoom(1 / 1.5), "0": () => this.fit(),
        ArrowLeft: () => this.pan(step, 0), ArrowRight: () => this.pan(-step, 0),
        ArrowUp: () => this.pan(0, step), ArrowDown: () => this.pan(0, -step),
      };
      if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
    });
  }

  level() {
    // the coarsest level still at least as fine as the screen, among those the preview has
    const want = Math.max(0, Math.floor(Math.log2(1 / this.scale)));
    const levels = this.meta.levels.map((l) => l.level);
    const finer = levels.filter((l) => l <= want);
    return finer.length ? Math.max(...finer) : Math.min(...levels);
  }

  tileUrl(level, ty, tx, layer) {
    return this.meta.tiles_url.replace("{level}", level).replace("{y}", ty).replace("{x}", tx) + `?layer=${layer}`;
  }

  bitmap(url) {
    let entry = this.cache.get(url);
    if (!entry) {
      entry = { bitmap: null, used: 0, failed: false };
      this.cache.set(url, entry);
      this.queue.push([url, entry]);
      this.pump();
    }
    entry.used = performance.now();
    return entry.bitmap;
  }

  pump() {
    while (this.inflight < 6 && this.queue.length) {
      const [url, entry] = this.queue.pop(); // newest first: what the view shows now
      this.inflight++;
      api(url).then((r) => r.blob()).then(createImageBitmap).then((b) => { entry.bitmap = b; })
        .catch(() => { entry.failed = true; })
        .finally(() => { this.inflight--; this.pump(); this.redraw(); });
    }
    if (this.cache.size > 600) { // forget the least recently drawn tiles
      const old = [...this.cache.entries()].filter(([, e]) => e.bitmap).sort((a, b) => a[1].used - b[1].used);
      for (const [url, e] of old.slice(0, this.cache.size - 400)) { e.bitmap.close(); this.cache.delete(url); }
    }
  }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const { ctx, canvas, meta } = this;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!meta) return;
    const showMask = $("show-mask").checked;
    const maskLayer = $("style").value;
    const alpha = Number($("opacity").value) / 100;
    ctx.imageSmoothingEnabled = this.scale < 1;
    const coarsest = Math.max(...meta.levels.map((l) => l.level));
    let complete = true;
    // the coarsest level first (one tile, always there), then the one that matches the zoom
    for (const level of new Set([coarsest, this.level()])) {
      const info = meta.levels.find((l) => l.level === level);
      const span = meta.tile * info.factor; // image pixels per tile
      const [rows, cols] = info.grid;
      const t0 = Math.max(0, Math.floor(this.y / span)), t1 = Math.min(rows - 1, Math.floor((this.y + canvas.height / this.scale) / span));
      const s0 = Math.max(0, Math.floor(this.x / span)), s1 = Math.min(cols - 1, Math.floor((this.x + canvas.width / this.scale) / span));
      for (let ty = t0; ty <= t1; ty++) {
        for (let tx = s0; tx <= s1; tx++) {
          const dx = (tx * span - this.x) * this.scale, dy = (ty * span - this.y) * this.scale;
          const image = this.bitmap(this.tileUrl(level, ty, tx, "image"));
          const mask = showMask ? this.bitmap(this.tileUrl(level, ty, tx, maskLayer)) : null;
          if (!image || (showMask && !mask)) complete = false;
          if (image) {
            const w = image.width * info.factor * this.scale, h = image.height * info.factor * this.scale;
            ctx.globalAlpha = 1;
            ctx.drawImage(image, dx, dy, w, h);
            if (mask) {
              ctx.globalAlpha = alpha;
              ctx.drawImage(mask, dx, dy, w, h);
            }
          }
        }
      }
    }
    ctx.globalAlpha = 1;
    canvas.dataset.state = complete ? "ready" : "loading";
    canvas.dataset.level = String(this.level());
  }
}

let viewer = null;

async function open(item) {
  for (const j of jobs) j.li.classList.toggle("current", j === item);
  const record = item.record;
  $("viewer").hidden = false;
  $("viewer-title").textContent = `Result: ${item.file.name}`;
  $("count").textContent = record.objects != null ? `${record.objects} objects` : "";
  downloads(item);
  if (!viewer) viewer = new Viewer($("canvas"));
  if (!record.preview_url) {
    $("legend").textContent = "No preview for this job (it ran on a cluster, or without one).";
    return;
  }
  try {
    item.preview = item.preview || (await (await api(record.preview_url)).json());
  } catch (e) {
    $("legend").textContent = e.message;
    return;
  }
  legend(item.preview);
  viewer.show(item.preview);
}

function legend(meta) {
  const el = $("legend");
  el.textContent = `${meta.width} × ${meta.height} px.`;
  for (const c of meta.classes) {
    if (!c.rgb) continue;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = `rgb(${c.rgb.join(",")})`;
    el.append(sw, c.name);
  }
}

function downloads(item) {
  const box = $("downloads");
  box.replaceChildren();
  const r = item.record;
  const stem = item.file.name.replace(/\.[^.]+$/, "");
  const kind = r.options.output === "labels" ? "mask" : r.options.output;
  const files = [[`Download ${kind}`, r.result_url, `${stem}_${kind}.tif`, "download-result"]];
  if (r.table_url) files.push(["Download table (CSV)", r.table_url, `${stem}_objects.csv`, "download-table"]);
  if (r.geojson_url) files.push(["Download outlines (GeoJSON)", r.geojson_url, `${stem}_objects.geojson`, "download-geojson"]);
  if (r.preview_url) files.push(["Download preview (PNG)", r.preview_url + ".png", `${stem}_preview.png`, "download-preview"]);
  for (const [text, url, name, id] of files) {
    const b = document.createElement("button");
    b.type = "button";
    b.id = id;
    b.textContent = text;
    b.onclick = async () => {
      try {
        const blob = await (await api(url)).blob();
        const a = document.createElement("a");
        a.href = URL.createObjectURL(blob);
        a.download = name;
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(a.href), 60000);
      } catch (e) {
        $("notice").textContent = e.message;
      }
    };
    box.appendChild(b);
  }
}

// --- wiring ---------------------------------------------------------------------------------
function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY, key.value.trim());
    showModel();
  });
  const drop = $("drop"), picker = $("files");
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) submit(e.dataTransfer.files);
  });
  picker.addEventListener("change", () => {
    if (picker.files.length) submit(picker.files);
    picker.value = "";
  });
  for (const id of ["show-mask", "style", "opacity"]) $(id).addEventListener("input", () => viewer && viewer.redraw());
  $("zoom-in").onclick = () => viewer && viewer.zoom(1.5);
  $("zoom-out").onclick = () => viewer && viewer.zoom(1 / 1.5);
  $("zoom-fit").onclick = () => viewer && viewer.fit();
  showModel();
}

document.addEventListener("DOMContentLoaded", init);
