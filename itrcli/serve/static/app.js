// itr serve's page: search, a grid of thumbnails, a viewer. No framework, no build step.
// Every string from the library (paths, camera names, words read in photos) reaches the
// page through textContent or an attribute set by the DOM API, never as HTML.
"use strict";

const PAGE = 40;            // results a page
const FILTERS = ["after", "before", "in", "camera", "near", "kind", "sort"];

const $ = (id) => document.getElementById(id);
const state = {
  params: null,      // URLSearchParams of the current search (null: an upload)
  upload: null,      // the File searched by, for its next pages
  hits: [],
  next: null,        // the next page's token
  loading: false,
  current: -1,       // the hit open in the viewer
  seq: 0,            // ignores the answers of superseded searches
};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.classList.toggle("error", !!isError);
}

function place(lat, lon) {
  if (lat === null || lat === undefined || lon === null || lon === undefined) return null;
  const ns = lat >= 0 ? "N" : "S", ew = lon >= 0 ? "E" : "W";
  return `${Math.abs(lat).toFixed(3)}°${ns} ${Math.abs(lon).toFixed(3)}°${ew}`;
}

function clock(t) {
  if (t === null || t === undefined) return null;
  const m = Math.floor(t / 60), s = Math.floor(t % 60);
  return `${m}:${String(s).padStart(2, "0")}`;
}

function basename(p) {
  const i = Math.max(p.lastIndexOf("/"), p.lastIndexOf("\\"));
  return i >= 0 ? p.slice(i + 1) : p;
}

async function api(url, options) {
  const r = await fetch(url, Object.assign({credentials: "same-origin"}, options || {}));
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    let msg = (body && body.error) || `${r.status} ${r.statusText}`;
    if (r.status === 401) msg = "This server needs its token: open the address that itr serve printed (it ends in ?token=…).";
    throw new Error(msg);
  }
  return body;
}

// -- the search, its URL and its pages ------------------------------------------------------

function paramsFromForm() {
  const p = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) p.set("q", q);
  for (const name of FILTERS) {
    const v = $("f-" + name).value.trim();
    if (v && !(name === "sort" && v === "score")) p.set(name, v);
  }
  if ($("rerank").checked) p.set("rerank", "1");
  return p;
}

function formFromParams(p) {
  $("q").value = p.get("q") || "";
  for (const name of FILTERS) $("f-" + name).value = p.get(name) || (name === "sort" ? "score" : "");
  $("rerank").checked = p.get("rerank") === "1";
  const any = FILTERS.some((n) => p.get(n) && !(n === "sort" && p.get(n) === "score"));
  if (any) showFilters(true);
}

function showFilters(on) {
  $("filters").hidden = !on;
  $("toggle-filters").setAttribute("aria-expanded", on ? "true" : "false");
}

function go(p, push) {
  const url = p.toString() ? "?" + p.toString() : location.pathname;
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
  run(p);
}

function clear() {
  state.hits = [];
  state.next = null;
  $("grid").replaceChildren();
  $("more").hidden = true;
}

async function run(p) {
  closeViewer();
  state.params = p;
  state.upload = null;
  clear();
  if (!p.get("q") && !p.get("like")) {
    $("empty").hidden = false;
    setStatus("");
    document.title = "itr";
    return;
  }
  $("empty").hidden = true;
  document.title = (p.get("q") || "more like this") + " – itr";
  await page(true);
}

async function page(first) {
  if (state.loading) return;
  if (!first && !state.next) return;
  state.loading = true;
  const seq = first ? ++state.seq : state.seq;
  let body;
  try {
    let url, options;
    const p = new URLSearchParams(state.params || "");
    p.set("n", String(PAGE));
    if (!first) p.set("next", state.next);
    if (state.upload) {
      const form = new FormData();
      form.append("image", state.upload, state.upload.name || "image");
      url = "/api/search?" + p.toString();
      options = {method: "POST", body: form};
    } else {
      url = "/api/search?" + p.toString();
    }
    if (first) setStatus(p.get("rerank") ? "Searching and re-ranking…" : "Searching…");
    body = await api(url, options);
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
    state.loading = false;
    return;
  }
  state.loading = false;
  if (seq !== state.seq) return;   // a newer search started meanwhile
  const start = state.hits.length;
  state.hits.push(...body.results);
  state.next = body.next;
  const grid = $("grid");
  body.results.forEach((h, i) => grid.append(card(h, start + i)));
  $("more").hidden = !state.next;
  const n = state.hits.length;
  const ms = body.timings && body.timings.total ? ` in ${(body.timings.total * 1000).toFixed(0)} ms` : "";
  const what = state.upload ? "the image" : (state.params.get("like") ? "more like this" : `“${body.query}”`);
  setStatus(n ? `${n}${state.next ? "+" : ""} result${n === 1 ? "" : "s"} for ${what}${first ? ms : ""}` :
    `No results for ${what}` + (FILTERS.some((f) => state.params && state.params.get(f)) ? " with these filters" : ""));
  if (first) observeMore();
}

function card(h, i) {
  const w = h.width || 4, ht = h.height || 3;
  const img = el("img", {src: h.thumb, alt: basename(h.path), loading: "lazy", decoding: "async",
    width: w, height: ht});
  img.addEventListener("error", () => fig.classList.add("broken"), {once: true});
  const bits = [h.score.toFixed(3)];
  if (h.rerank_score !== undefined && h.rerank_score !== null) bits.unshift("match " + h.rerank_score.toFixed(3));
  const cap = el("figcaption", {},
    el("span", {class: "score", text: bits.join(" · ")}),
    h.date ? el("span", {class: "date", text: h.date}) : null,
    place(h.lat, h.lon) ? el("span", {class: "place", text: place(h.lat, h.lon)}) : null);
  const badge = h.kind === "video" ? el("span", {class: "badge", text: "▶ " + (clock(h.time) || "")}) : null;
  const btn = el("button", {type: "button", class: "thumb", title: h.path, "data-index": i}, img, badge);
  btn.addEventListener("click", () => openViewer(i));
  const fig = el("figure", {class: "card"}, btn, cap);
  return fig;
}

let observer = null;
function observeMore() {
  if (!("IntersectionObserver" in window)) return;
  if (observer) observer.disconnect();
  observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && state.next) page(false);
  }, {rootMargin: "600px"});
  observer.observe($("more-wrap"));
}

// -- searching by an image --------------------------------------------------------------------

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus("Not an image: " + (file.type || "unknown type"), true);
    return;
  }
  closeViewer();
  history.pushState(null, "", location.pathname);
  const p = paramsFromForm();
  p.delete("q");
  p.delete("rerank");
  state.params = p;
  state.upload = file;
  clear();
  $("empty").hidden = true;
  $("q").value = "";
  document.title = "image search – itr";
  page(true);
}

// -- the viewer -------------------------------------------------------------------------------

function closeViewer() {
  const v = $("viewer");
  if (v.hidden) return;
  v.hidden = true;
  const m = $("v-media");
  for (const video of m.querySelectorAll("video")) video.pause();
  m.replaceChildren();
  document.body.classList.remove("viewing");
  const btn = document.querySelector(`[data-index="${state.current}"]`);
  if (btn) btn.focus();
  state.current = -1;
}

async function openViewer(i) {
  if (i < 0 || i >= state.hits.length) return;
  state.current = i;
  const h = state.hits[i];
  const v = $("viewer");
  v.hidden = false;
  document.body.classList.add("viewing");
  const media = $("v-media");
  let node;
  if (h.kind === "video") {
    const t = h.time || 0;
    node = el("video", {src: `${h.file}#t=${t.toFixed(3)}`, controls: true, autoplay: true,
      muted: true, playsinline: true, preload: "metadata", poster: h.large});
    node.muted = true;
    node.addEventListener("loadedmetadata", () => { if (Math.abs(node.currentTime - t) > 0.5) node.currentTime = t; }, {once: true});
  } else {
    node = el("img", {src: h.large, alt: basename(h.path)});
    // the thumbnail first: the large one replaces it once decoded
    node.style.backgroundImage = `url("${encodeURI(h.thumb)}")`;
  }
  media.replaceChildren(node);
  $("v-title").textContent = basename(h.path);
  $("v-open").href = h.file;
  $("v-prev").disabled = i === 0;
  $("v-next").disabled = i === state.hits.length - 1 && !state.next;
  fillMeta(h, null);
  $("v-words-h").hidden = true;
  $("v-words").hidden = true;
  $("v-near").hidden = !(h.lat !== null && h.lat !== undefined);
  $("v-close").focus();
  try {
    const item = await api(`/api/item/${h.id}`);
    if (state.current !== i) return;
    fillMeta(h, item);
    if (item.text && item.text.length) {
      $("v-words-h").hidden = false;
      const w = $("v-words");
      w.hidden = false;
      w.replaceChildren(...item.text.map((line) => el("span", {class: "line", text: line})));
    }
  } catch (e) {
    if (state.current === i) fillMeta(h, {error: e.message});
  }
  if (i >= state.hits.length - 3 && state.next) page(false);
}

function fillMeta(h, item) {
  const rows = [
    ["Path", h.path],
    ["Score", h.score.toFixed(4) + (h.rerank_score !== undefined && h.rerank_score !== null ? ` (match ${h.rerank_score.toFixed(4)})` : "")],
    ["Rank", String(h.rank)],
    ["Date", (item && item.taken_at) || h.taken_at || h.date],
    ["Camera", (item && item.camera) || h.camera],
    ["Place", place(h.lat, h.lon)],
    ["Size", h.width && h.height ? `${h.width} × ${h.height}` : null],
    ["File", item && item.size ? `${(item.size / 1e6).toFixed(1)} MB` : null],
    ["Kind", h.kind === "video" ? `video, ${clock(h.duration) || "?"}; best frame at ${clock(h.time) || "0:00"}` : null],
    ["Note", item && item.exists === false ? "the file is gone since it was indexed" : (item && item.error) || null],
  ];
  const dl = $("v-meta");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === "") continue;
    dl.append(el("dt", {text: k}), el("dd", {text: v}));
  }
}

function step(d) {
  if (state.current < 0) return;
  const j = state.current + d;
  if (j >= 0 && j < state.hits.length) openViewer(j);
  else if (j >= state.hits.length && state.next) page(false).then(() => openViewer(j));
}

// -- wiring -----------------------------------------------------------------------------------

function typing(e) {
  const t = e.target;
  return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (e) => { e.preventDefault(); go(paramsFromForm(), true); });
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); go(paramsFromForm(), true); });
  $("rerank").addEventListener("change", () => { if ($("q").value.trim()) go(paramsFromForm(), true); });
  $("toggle-filters").addEventListener("click", () => showFilters($("filters").hidden));
  $("clear-filters").addEventListener("click", () => {
    for (const n of FILTERS) $("f-" + n).value = n === "sort" ? "score" : "";
    go(paramsFromForm(), true);
  });
  $("more").addEventListener("click", () => page(false));
  $("image").addEventListener("change", (e) => { searchImage(e.target.files[0]); e.target.value = ""; });
  $("v-close").addEventListener("click", closeViewer);
  $("v-prev").addEventListener("click", () => step(-1));
  $("v-next").addEventListener("click", () => step(1));
  $("v-like").addEventListener("click", () => {
    const h = state.hits[state.current];
    if (!h) return;
    const p = new URLSearchParams();
    p.set("like", String(h.id));
    if (h.kind === "video" && h.time !== null && h.time !== undefined) p.set("at", h.time.toFixed(3));
    for (const n of FILTERS) { const v = $("f-" + n).value.trim(); if (v && !(n === "sort" && v === "score")) p.set(n, v); }
    $("q").value = "";
    go(p, true);
  });
  $("v-near").addEventListener("click", () => {
    const h = state.hits[state.current];
    if (!h || h.lat === null) return;
    $("f-near").value = `${h.lat.toFixed(5)},${h.lon.toFixed(5)},5`;
    showFilters(true);
    const p = paramsFromForm();
    if (!p.get("q") && state.params && state.params.get("like")) p.set("like", state.params.get("like"));
    go(p, true);
  });
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer") || e.target.classList.contains("stage")) closeViewer(); });

  document.addEventListener("keydown", (e) => {
    if (!$("viewer").hidden) {
      if (e.key === "Escape") { e.preventDefault(); closeViewer(); }
      else if (e.key === "ArrowRight" && !typing(e)) { e.preventDefault(); step(1); }
      else if (e.key === "ArrowLeft" && !typing(e)) { e.preventDefault(); step(-1); }
      return;
    }
    if (e.key === "/" && !typing(e) && !e.ctrlKey && !e.metaKey && !e.altKey) {
      e.preventDefault();
      $("q").focus();
      $("q").select();
    }
  });

  // drop or paste an image anywhere
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; $("drop").hidden = false; } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("drop").hidden = true; });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const items = Array.from((e.clipboardData && e.clipboardData.items) || []);
    const item = items.find((it) => it.kind === "file" && it.type.startsWith("image/"));
    if (item) { e.preventDefault(); searchImage(item.getAsFile()); }
  });

  window.addEventListener("popstate", () => {
    const p = new URLSearchParams(location.search);
    formFromParams(p);
    run(p);
  });
  const p = new URLSearchParams(location.search);
  formFromParams(p);
  run(p);
  if (!p.get("q")) $("q").focus();
});
