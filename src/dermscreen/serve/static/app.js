// dermscreen page: sends one image to /api/v1/analyze and renders the answer.
// Privacy: everything here lives in this tab's memory (no storage APIs, no cookies); requests go
// only to this server. The tier what-if in debug mode is computed here and never sent anywhere.
"use strict";

const $ = (id) => document.getElementById(id);
const DEBUG = new URLSearchParams(location.search).get("debug") === "1";
const TIER_WORDS = { high: "High", moderate: "Moderate", low: "Low", cannot_assess: "Cannot assess" };

const state = {
  card: null,          // GET /api/v1/model
  // timeline: {id, when, name, blob (the image itself, for "Analyse again"), url (null: the browser cannot show
  // the file), result, picked (ticked for comparison)}
  entries: [],
  current: null,       // the entry shown in the result card: "Analyse again" re-analyses its image
  nextId: 1,
  inFlight: null,      // {controller, name} of the analysis under way (null: none); "Forget all" aborts it
};
const UNREACHABLE = "The server could not be reached; check the connection and try again.";

// ---- small DOM helpers --------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function pct(p) { return `${Math.round(p * 100)}%`; }

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ---- model card ---------------------------------------------------------------------------
// How the model did on images it never saw (its held-out test split), in the words a referrer needs: how many
// malignant lesions its referral threshold caught, and at what cost in benign ones referred.
function performanceLine(card) {
  const held = card.held_out;
  const referral = held && held.operating_points && held.operating_points.sensitivity_first;
  if (!referral || !referral.sensitivity || !referral.specificity) {
    return "No held-out test results are recorded for this model: see its validation numbers in the API's model card.";
  }
  const pct = (entry) => `${(100 * entry.value).toFixed(1)} %`;
  const ci = (entry) => entry.ci95
    ? ` (95 % CI ${(100 * entry.ci95[0]).toFixed(0)}–${(100 * entry.ci95[1]).toFixed(0)} %)` : "";
  return `On ${held.images} held-out test images, its referral threshold flagged ${pct(referral.sensitivity)}` +
    `${ci(referral.sensitivity)} of malignant lesions and left ${pct(referral.specificity)} of benign ones ` +
    "unreferred; it can miss a skin cancer.";
}
async function loadCard() {
  try {
    const res = await fetch("/api/v1/model", { cache: "no-store", credentials: "omit" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    state.card = await res.json();
  } catch (err) {
    $("model-line").textContent = "The model card could not be loaded; analyses may still work.";
    return;
  }
  const card = state.card;
  // a bundle refit by `dermscreen calibrate` says on what, so its risk tiers are read with that in mind
  const fitted = card.calibration && card.calibration.split && card.calibration.split !== "val" ? ` · ${card.calibration.split}` : "";
  $("model-line").textContent = `Model ${card.name} ${card.version} (${card.sha256.slice(0, 12)})${fitted} · ` +
    `${card.licence} · Intended use: ${card.intended_use}`;
  $("model-performance").textContent = performanceLine(card);
  if (card.disclaimer) $("disclaimer-text").textContent = card.disclaimer.replace(/^.*?not a diagnosis\.\s*/, "");
  const site = $("site");
  for (const name of card.sites) site.append(el("option", { value: name, text: name }));
  $("metadata-note").textContent = card.uses_metadata
    ? "This model uses these details in its estimate."
    : "This model does not use these details; they are neither stored nor returned with the result.";
}

// ---- sending an image ---------------------------------------------------------------------
function formFor(blob, name, preview) {
  const form = new FormData();
  form.append("image", blob, name || "image");
  for (const id of ["age", "sex", "site"]) {
    const value = $(id).value.trim();
    if (value) form.append(id, value);
  }
  form.append("heatmap", $("opt-heatmap").checked ? "true" : "false");
  form.append("tta", $("opt-tta").checked ? "true" : "false");
  if (preview) form.append("preview", "true");
  return form;
}

// Chromium and Firefox cannot draw TIFF, HEIC or DICOM (Safari draws some): whether this browser can show the
// file decides whether the server is asked for a JPEG preview of the analysed image to show under the overlays.
function canDisplay(url) {
  return new Promise((resolve) => {
    const probe = new Image();
    probe.onload = () => resolve(probe.naturalWidth > 0);
    probe.onerror = () => resolve(false);
    probe.src = url;
  });
}

// note: said after each status line of this analysis (e.g. that other dropped files were left out)
async function analyze(blob, name, note = "") {
  name = name || "the image";
  if (state.inFlight) {  // one at a time: a second image would race the first for the result card
    setStatus(`Still analysing ${state.inFlight.name}: add ${name} again when it is done.`, true);
    return;
  }
  const controller = new AbortController();
  state.inFlight = { controller, name };
  updateAnalyseButton();
  setStatus(`Analysing ${name}…${note}`);
  let url = URL.createObjectURL(blob);
  try {
    if (!(await canDisplay(url))) {
      URL.revokeObjectURL(url);
      url = null;
    }
    const res = await post(formFor(blob, name, !url), controller.signal);
    const body = await res.json().catch(() => ({ message: `The server answered HTTP ${res.status}.` }));
    // "Forget all" while the answer was on its way: it must leave no trace
    if (controller.signal.aborted) return;
    if (!res.ok) throw new Error(body.message || `The server answered HTTP ${res.status}.`);
    const entry = addEntry(blob, url, name, body);
    url = null;  // the entry owns it now
    showEntry(entry, true);
    setStatus(`Done: ${summary(body)}${note}`);
  } catch (err) {
    if (!controller.signal.aborted) setStatus(err.message || String(err), true);
  } finally {
    if (url) URL.revokeObjectURL(url);
    if (state.inFlight && state.inFlight.controller === controller) state.inFlight = null;
    updateAnalyseButton();
  }
}

// fetch rejects with a bare TypeError ("Failed to fetch") when the server cannot be reached: say it in words
async function post(form, signal) {
  try {
    return await fetch("/api/v1/analyze", {
      method: "POST", body: form, cache: "no-store", credentials: "omit", signal,
    });
  } catch (err) {
    if (signal.aborted) throw err;
    throw new Error(UNREACHABLE);
  }
}

// The status line's short account of a result: screen readers hear this, not the whole (long) result card.
function summary(r) {
  const tier = r.risk.label || TIER_WORDS[r.risk.tier] || r.risk.tier;
  if (r.status !== "ok") return `${tier}. ${(r.reasons || [])[0] || ""}`.trim();
  const top = (r.top_diagnoses || [])[0];
  return `${tier}, malignancy score ${Math.round(r.malignancy_score)} of 100` +
    (top ? `; most likely ${top.name} (${pct(top.probability)}).` : ".");
}

// "Analyse again" appears once there is a result, and re-analyses the image of the result on screen.
function updateAnalyseButton() {
  $("analyze").hidden = !state.current;
  $("analyze").disabled = !!state.inFlight;
}

// A drop may hold several files: one is analysed, and the status says so rather than losing the others silently.
function acceptFiles(files) {
  const images = [...files];
  if (!images.length) return;
  const rest = images.length - 1;
  const note = rest ? ` One image at a time: ${rest} other file${rest > 1 ? "s were" : " was"} not analysed; ` +
    "add them one by one." : "";
  acceptFile(images[0], note);
}

function acceptFile(file, note = "") {
  if (!file) return;
  analyze(file, file.name || "pasted image", note);
}

// ---- inputs: file, drag-and-drop, paste, camera ----------------------------------------------
function wireInputs() {
  $("file").addEventListener("change", (e) => { acceptFile(e.target.files[0]); e.target.value = ""; });
  $("camera-fallback").addEventListener("change", (e) => { acceptFile(e.target.files[0]); e.target.value = ""; });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { if (hasFiles(e)) zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  // a file dropped anywhere on the page counts as dropped on the zone: left to the browser, it would open the
  // file in place of this page and lose the timeline
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;  // text dragged into a field keeps its default
    e.preventDefault();
    zone.classList.remove("over");
    acceptFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return;
    e.preventDefault();
    const file = item.getAsFile();
    acceptFile(new File([file], file.name && file.name !== "image.png" ? file.name : "pasted image", { type: file.type }));
  });
  $("analyze").addEventListener("click", () => state.current && analyze(state.current.blob, state.current.name));
  $("camera-open").addEventListener("click", openCamera);
  $("camera-close").addEventListener("click", closeCamera);
  $("camera-snap").addEventListener("click", snapCamera);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("camera").hidden) closeCamera(); });
}

function hasFiles(e) { return [...(e.dataTransfer?.types || [])].includes("Files"); }

let cameraStream = null;

async function openCamera() {
  if (!navigator.mediaDevices?.getUserMedia) { $("camera-fallback").click(); return; }
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 1920 } }, audio: false,
    });
  } catch (err) {
    // no camera, or permission refused: the phone's own camera app via the capture input still works
    $("camera-fallback").click();
    return;
  }
  $("camera-video").srcObject = cameraStream;
  $("camera").hidden = false;
  $("camera-snap").focus();
}

function closeCamera() {
  if (cameraStream) cameraStream.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("camera-video").srcObject = null;
  $("camera").hidden = true;
  $("camera-open").focus();
}

function snapCamera() {
  const video = $("camera-video");
  const canvas = el("canvas", { width: video.videoWidth, height: video.videoHeight });
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => { closeCamera(); if (blob) analyze(blob, "camera photo"); }, "image/jpeg", 0.95);
}

// ---- timeline (page memory only) --------------------------------------------------------------
function addEntry(blob, url, name, result) {
  const entry = { id: state.nextId++, when: new Date(), name, blob, url, result, picked: false };
  state.entries.push(entry);
  renderTimeline();
  return entry;
}

function renderTimeline() {
  const list = $("timeline");
  list.replaceChildren();
  $("timeline-panel").hidden = state.entries.length === 0;
  for (const entry of state.entries) list.append(timelineItem(entry));
  updateCompareButton();
}

function timelineItem(entry) {
  const r = entry.result;
  const label = `${entry.name}, ${entry.when.toLocaleTimeString()}, ${TIER_WORDS[r.risk.tier]}`;
  const src = imageSrc(entry);
  const open = el("button", { type: "button", class: "entry", "aria-label": `Show ${label}`, onclick: () => revisit(entry) },
    src ? el("img", { src, alt: "" }) : el("span", { class: "no-preview", text: "No preview" }),
    el("span", { class: `badge tier-${r.risk.tier}`, text: TIER_WORDS[r.risk.tier] }), " ",
    el("span", { text: r.status === "ok" ? `${Math.round(r.malignancy_score)}/100` : "—" }),
    el("div", { class: "when", text: `${entry.when.toLocaleTimeString()} · ${entry.name}` }));
  // the tick lives in the entry: the list is rebuilt whenever an entry is shown or added
  const pick = el("input", { type: "checkbox", id: `pick-${entry.id}`, checked: entry.picked,
    "aria-label": `Compare: ${entry.name}, ${entry.when.toLocaleTimeString()}`,
    onchange: (e) => { entry.picked = e.target.checked; picksChanged(); } });
  const item = el("li", { class: state.current === entry ? "current" : "" }, open,
    el("label", { for: `pick-${entry.id}` }, pick, " compare"));
  return item;
}

function selectedEntries() { return state.entries.filter((e) => e.picked); }

function updateCompareButton() { $("compare").disabled = selectedEntries().length !== 2; }

// The compare view shows the ticked pair: once the ticks change it would show something else, so it closes.
function picksChanged() {
  updateCompareButton();
  const view = $("compare-view");
  const shown = view.dataset.ids || "";
  if (!view.hidden && shown !== selectedEntries().map((e) => e.id).join(",")) closeCompare();
}

function closeCompare() {
  const view = $("compare-view");
  view.hidden = true;
  view.replaceChildren();
  delete view.dataset.ids;
}

function showCompare() {
  const view = $("compare-view");
  view.replaceChildren(...selectedEntries().map((e) => {
    const box = el("div", {}, el("h3", { class: "compare-title", text: `${e.name} · ${e.when.toLocaleTimeString()}` }));
    box.append(...resultCard(e));
    return box;
  }));
  view.dataset.ids = selectedEntries().map((e) => e.id).join(",");
  view.hidden = false;
  const first = view.querySelector(".compare-title");
  first.setAttribute("tabindex", "-1");
  first.focus();
}

function forgetAll() {
  if (state.inFlight) state.inFlight.controller.abort();  // its answer must not come back as a new entry
  state.inFlight = null;
  for (const e of state.entries) if (e.url) URL.revokeObjectURL(e.url);
  state.entries = [];  // the entries hold the images' Blobs: dropping them lets the browser free the images
  state.current = null;
  for (const id of ["age", "sex", "site"]) $(id).value = "";  // the patient details go with the images
  updateAnalyseButton();
  $("result").hidden = true;
  $("result-body").replaceChildren();
  $("skip").hidden = true;
  $("debug").hidden = true;
  closeCompare();
  renderTimeline();
  setStatus("Forgotten: this page holds no image or result any more.");
  // the button pressed is gone with the timeline: focus goes to the first control, choosing a new image
  $("file").focus();
}

// ---- result card -------------------------------------------------------------------------------
function showEntry(entry, focus) {
  state.current = entry;
  $("result-body").replaceChildren(...resultCard(entry));
  $("result").hidden = false;
  $("skip").hidden = false;
  renderTimeline();
  updateAnalyseButton();
  if (DEBUG) showDebug(entry.result);
  if (focus) focusTop($("result"));
}

// Revisiting an earlier analysis replaces the card without a word: the status line says which one is shown.
function revisit(entry) {
  showEntry(entry, true);
  setStatus(`Showing ${entry.name}, ${entry.when.toLocaleTimeString()}: ${summary(entry.result)}`);
}

// Chromium scrolls a focused element taller than the viewport so that its top is cut off, yet the top (tier
// and recommendation) is what must be seen first: focus without scrolling, then bring the top into view.
function focusTop(section) {
  section.focus({ preventScroll: true });
  const head = section.querySelector(".recommendation") || section;
  if (section.getBoundingClientRect().top < 0 || head.getBoundingClientRect().bottom > window.innerHeight) {
    section.scrollIntoView({ block: "start" });
  }
}

function resultCard(entry) {
  const r = entry.result;
  const parts = [
    el("div", { class: `tier tier-${r.risk.tier}`, "data-tier": r.risk.tier },
      el("strong", { text: r.risk.label || TIER_WORDS[r.risk.tier] }),
      el("span", { text: r.status === "ok" ? "risk tier" : "the model cannot assess this image" })),
    el("p", { class: "recommendation", text: r.risk.recommendation }),
  ];
  // the image checks come right after the tier: a quality warning must be read with it, not a screen below
  parts.push(messagesBlock(r));
  if (r.status === "ok") parts.push(scoreBlock(r), diagnosesBlock(r));
  parts.push(viewerBlock(entry), el("p", { class: "disclaimer", text: r.disclaimer }), metaBlock(r));
  return parts;
}

function scoreBlock(r) {
  const meter = el("div", { class: "meter", role: "img", "aria-label": `Malignancy score ${Math.round(r.malignancy_score)} out of 100` });
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(100, r.malignancy_score))}%`;
  meter.append(fill);
  return el("div", {},
    el("div", { class: "score" }, el("span", { class: "value", text: `${Math.round(r.malignancy_score)}` }), meter),
    el("p", { class: "hint", text: "Malignancy score: the model's calibrated probability (0–100) that the lesion is malignant (melanoma, basal cell carcinoma, actinic keratosis / intraepithelial carcinoma)." }));
}

function diagnosesBlock(r) {
  const list = el("ul", { class: "diagnoses", "aria-label": "Most likely diagnoses" });
  const top = r.top_diagnoses && r.top_diagnoses.length ? r.top_diagnoses : r.probabilities.slice(0, 3);
  for (const d of top) {
    const bar = el("span");
    bar.style.width = `${(d.probability * 100).toFixed(1)}%`;
    list.append(el("li", {},
      el("span", { text: `${d.name}${d.group === "malignant" ? " (malignant)" : ""}` }),
      el("div", { class: `bar ${d.group}`, role: "img", "aria-label": `${d.name}: ${pct(d.probability)}` }, bar),
      el("span", { class: "pct", text: pct(d.probability) })));
  }
  return el("div", {}, el("h3", { text: "Most likely diagnoses" }), list);
}

let viewerCount = 0;
const MALIGNANT_ALT = "Heatmap over the image: warm colours mark where the model found evidence of malignancy";

function viewerBlock(entry) {
  const h = entry.result.heatmap;
  const lesion = entry.result.lesion;
  const src = imageSrc(entry);
  const base = src ? el("img", { src, alt: `The analysed image: ${entry.name}` })
    : el("p", { class: "no-preview", text: `No preview: this browser cannot show ${entry.name}.` });
  // the overlays cover the image's box: without an image, the note keeps their shape
  if (!src && h && h.size) base.style.aspectRatio = `${h.size[0]} / ${h.size[1]}`;
  const viewer = el("div", { class: "viewer" }, base);
  const controls = [];
  if (h && h.overlay_png) controls.push(...heatmapControls(entry, viewer, h));
  if (lesion && lesion.outline_png) controls.push(outlineControl(viewer, lesion));
  return el("div", { class: "viewer-row" }, el("div", { class: "viewer-col" }, viewer, ...controls), lesionBlock(lesion));
}

// The upload itself where this browser can draw it, else the server's JPEG of the analysed image (null: neither).
function imageSrc(entry) { return entry.url || entry.result.preview_jpeg || null; }

function heatmapControls(entry, viewer, h) {
  const note = el("p", { class: "hint", "aria-live": "polite" });
  const overlay = el("img", { class: "overlay", src: h.overlay_png, alt: MALIGNANT_ALT,
    onload: () => { note.textContent = isBlank(overlay) ? "The model found no evidence for this anywhere in the image." : ""; } });
  overlay.style.opacity = "0.8";
  viewer.append(overlay);
  const n = ++viewerCount;
  const slider = el("input", { type: "range", id: `opacity-${n}`, min: "0", max: "1", step: "0.05", value: "0.8",
    oninput: (e) => { overlay.style.opacity = e.target.value; } });
  const which = el("select", { id: `which-${n}`, onchange: (e) => {
    const top = e.target.value === "top";
    overlay.src = top ? h.top_class_overlay_png : h.overlay_png;
    overlay.alt = top ? `Heatmap over the image: evidence for ${topName(entry.result)}` : MALIGNANT_ALT;
  } }, el("option", { value: "malignant", text: "Evidence of malignancy" }),
  el("option", { value: "top", text: `Evidence for ${topName(entry.result)}` }));
  return [el("div", { class: "opacity" }, el("label", { for: `opacity-${n}`, text: "Heatmap opacity" }), slider),
    el("div", { class: "opacity" }, el("label", { for: `which-${n}`, text: "Heatmap shows" }), which), note];
}

// The lesion outline sits above the heatmap (a thin cyan line) and can be hidden to see the skin under it.
function outlineControl(viewer, lesion) {
  const outline = el("img", { class: "outline", src: lesion.outline_png, alt: "Lesion outline: a cyan line around the lesion" });
  viewer.append(outline);
  const n = ++viewerCount;
  const box = el("input", { type: "checkbox", id: `outline-${n}`, checked: true,
    onchange: (e) => { outline.hidden = !e.target.checked; } });
  return el("div", { class: "opacity" }, el("label", { for: `outline-${n}` }, box, " Show the lesion outline"));
}

// ABCD descriptors next to the image: each cue with its measured value and one plain sentence.
function lesionBlock(lesion) {
  if (!lesion) return null;
  const block = el("div", { class: "lesion" }, el("h3", { text: "Lesion (ABCD)" }), el("p", { class: "hint", text: lesion.message }));
  const a = lesion.abcd;
  if (!a) return block;
  const d = a.diameter;
  const cues = [
    ["Asymmetry", `${a.asymmetry.asymmetric_axes} of 2 axes`, a.asymmetry.explanation],
    ["Border", `compactness ${a.border.compactness.toFixed(2)}`, a.border.explanation],
    ["Colours", a.colours.present.length ? a.colours.present.join(", ") : "none clear", a.colours.explanation],
    ["Diameter", d.mm !== null && d.mm !== undefined ? `${d.mm.toFixed(1)} mm` : `${Math.round(d.pixels)} px`, d.explanation],
  ];
  const list = el("dl", { class: "abcd" });
  for (const [name, value, why] of cues) {
    list.append(el("dt", {}, el("strong", { text: name }), ` ${value}`), el("dd", { text: why }));
  }
  block.append(list, el("p", { class: "hint", text: a.note }));
  return block;
}

// An overlay is transparent where the model found no evidence; a fully transparent one deserves words.
function isBlank(img) {
  const canvas = el("canvas", { width: img.naturalWidth, height: img.naturalHeight });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) return false;
  return true;
}

function topName(r) {
  const top = (r.top_diagnoses || [])[0];
  return top ? top.name : "the top diagnosis";
}

function messagesBlock(r) {
  const items = [];
  for (const reason of r.reasons || []) items.push(el("li", { class: "refuse", text: reason }));
  for (const warning of (r.quality && r.quality.warnings) || []) items.push(el("li", { class: "warn", text: warning }));
  if (!items.length) items.push(el("li", { text: "Image quality is adequate and the image looks like the model's training images." }));
  return el("div", {}, el("h3", { text: "Image checks" }), el("ul", { class: "messages" }, ...items));
}

function metaBlock(r) {
  const m = r.model || {};
  const total = r.timings_ms && (r.timings_ms.total ?? Object.values(r.timings_ms).reduce((a, b) => a + b, 0));
  return el("p", { class: "meta", text: `Model ${m.name} ${m.version} (${(m.sha256 || "").slice(0, 12)})` +
    (total ? ` · ${Math.round(total)} ms` : "") + (m.licence ? ` · Licence: ${m.licence}` : "") });
}

// ---- debug mode: client-side what-if -------------------------------------------------------------
function softmax(logits, t) {
  const z = logits.map((v) => v / t);
  const max = Math.max(...z);
  const e = z.map((v) => Math.exp(v - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

// taxonomy order, as the logits are
function classes(r) { return r.probabilities && r.probabilities.length ? r.probabilities : (state.card ? state.card.classes : []); }

// The same rule as the Screener: out of distribution -> cannot assess; otherwise the strictest
// operating point the score reaches decides (thresholds sorted high to low -> high, moderate, ...).
function whatIfTier(pMal, oodScore, oodThreshold, ops) {
  if (oodScore !== null && oodThreshold !== null && oodScore > oodThreshold) return "cannot_assess";
  const sorted = [...ops].sort((a, b) => b.threshold - a.threshold);
  const names = ["high", "moderate"];
  for (let i = 0; i < sorted.length && i < names.length; i++) if (pMal >= sorted[i].threshold) return names[i];
  return "low";
}

function showDebug(r) {
  if (!r.debug) return;
  $("debug").hidden = false;
  const d = r.debug;
  setExact($("dbg-temperature"), d.temperature);
  const ood = $("dbg-ood");
  const oodMax = Math.max(1, (d.ood_threshold || 0) * 3, (d.ood_score || 0) * 1.5);
  ood.max = oodMax.toPrecision(3);
  ood.step = (oodMax / 200).toPrecision(2);
  setExact(ood, d.ood_threshold ?? 0);
  ood.disabled = d.ood_threshold === null || d.ood_threshold === undefined;
  const box = $("dbg-op-sliders");
  box.replaceChildren();
  for (const op of r.debug.operating_points) {
    const id = `dbg-op-${op.name}`;
    const slider = el("input", { type: "range", id, min: "0", max: "1", step: "0.01", "data-op": op.name, oninput: moved });
    setExact(slider, op.threshold);
    box.append(el("label", { for: id }, `Threshold “${op.name}” `, el("output", { id: `${id}-out` })), slider);
  }
  const colour = d.colour_threshold === null || d.colour_threshold === undefined ? "" :
    `, colour check ${fmt(d.colour_score)} (threshold ${fmt(d.colour_threshold)})`;
  $("dbg-facts").textContent = `Server: temperature ${fmt(d.temperature)}, OOD score ${fmt(d.ood_score)} ` +
    `(threshold ${fmt(d.ood_threshold)})${colour}, tier ${r.risk.tier}.`;
  recompute();
}

// A range input snaps its value to its step (temperature 0.732 → 0.75, threshold 0.0710 → 0.07), which could
// change the tier: until the user moves a slider, the what-if uses the server's exact value, so the untouched
// what-if is the server's own answer.
function setExact(slider, value) {
  slider.value = value;
  slider.dataset.exact = String(value);
}

function sliderValue(slider) { return Number(slider.dataset.exact ?? slider.value); }

function moved(e) {
  delete e.target.dataset.exact;
  recompute();
}

function fmt(v) {
  if (v === null || v === undefined) return "n/a";
  return Math.abs(v) >= 1000 ? Number(v).toPrecision(4) : Number(v).toFixed(3);
}

function recompute() {
  const r = state.current && state.current.result;
  if (!r || !r.debug) return;
  const T = sliderValue($("dbg-temperature"));
  $("dbg-temperature-out").textContent = T.toFixed(2);
  const oodThr = $("dbg-ood").disabled ? null : sliderValue($("dbg-ood"));
  $("dbg-ood-out").textContent = fmt(oodThr);
  const ops = [...document.querySelectorAll("#dbg-op-sliders input")].map((s) => {
    $(`${s.id}-out`).textContent = sliderValue(s).toFixed(2);
    return { name: s.dataset.op, threshold: sliderValue(s) };
  });
  if (!r.debug.logits.length) {
    $("dbg-tier").textContent = "no model output: the image was refused before the model ran";
    $("dbg-pmal").textContent = "n/a";
    $("dbg-logits").replaceChildren();
    return;
  }
  const probs = softmax(r.debug.logits, T);
  const cls = classes(r);
  const pMal = probs.reduce((sum, p, i) => sum + (cls[i] && cls[i].group === "malignant" ? p : 0), 0);
  const tier = whatIfTier(pMal, r.debug.ood_score ?? null, oodThr, ops);
  $("dbg-tier").textContent = TIER_WORDS[tier];
  $("dbg-tier").dataset.tier = tier;
  $("dbg-pmal").textContent = pct(pMal);
  renderLogits(r, probs, cls);
}

function renderLogits(r, probs, cls) {
  const server = Object.fromEntries((r.probabilities || []).map((p) => [p.code, p.probability]));
  $("dbg-logits").replaceChildren(...r.debug.logits.map((logit, i) => {
    const code = cls[i] ? cls[i].code : String(i);
    return el("tr", {}, el("td", { text: cls[i] ? `${cls[i].name} (${code})` : code }),
      el("td", { text: logit.toFixed(3) }), el("td", { text: server[code] !== undefined ? pct(server[code]) : "" }),
      el("td", { text: pct(probs[i]) }));
  }));
}

function wireDebug() {
  $("dbg-temperature").addEventListener("input", moved);
  $("dbg-ood").addEventListener("input", moved);
}

// ---- start --------------------------------------------------------------------------------------
wireInputs();
wireDebug();
$("compare").addEventListener("click", showCompare);
$("clear").addEventListener("click", forgetAll);
loadCard();
