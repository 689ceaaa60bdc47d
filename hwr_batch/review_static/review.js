"use strict";
const token = new URLSearchParams(location.search).get("token");
const LIMIT = 50;
let batch = {offset: 0, total: 0, fields: []};
let cursor = 0;  // position among all fields
let shownAt = 0;  // performance.now() when the current field was asked for
// Milliseconds from asking for a field to its crop and digits drawn, and of each save (read by benchmarks/).
const reviewTimings = {loads: [], saves: []};
const LOW_CONFIDENCE = 0.9;  // a digit read below this is drawn red
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const sep = path.includes("?") ? "&" : "?";
  const response = await fetch(path + sep + "token=" + encodeURIComponent(token), options);
  if (!response.ok) throw new Error(response.status + " " + (await response.text()));
  return response.json();
}

async function load(position) {
  shownAt = performance.now();
  if (position < batch.offset || position >= batch.offset + batch.fields.length) {
    const offset = Math.floor(position / LIMIT) * LIMIT;
    batch = await api(`api/fields?offset=${offset}&limit=${LIMIT}`);
  }
  cursor = Math.max(0, Math.min(position, batch.total));
  show();
}

function current() { return batch.fields[cursor - batch.offset]; }

function show() {
  const field = current();
  $("pos").textContent = `field ${Math.min(cursor + 1, batch.total)} of ${batch.total}`;
  $("marks").replaceChildren();
  $("view").dataset.shown = "";
  if (!field) { $("info").textContent = "All fields shown."; $("crop").removeAttribute("src"); return; }
  const crop = $("crop");
  const shown = () => { drawDigits(field); reviewTimings.loads.push(performance.now() - shownAt); };
  crop.onload = crop.onerror = shown;
  if (crop.getAttribute("src") === cropUrl(field) && crop.complete) shown();  // the same image: no new load event
  else crop.src = cropUrl(field);
  const next = batch.fields[cursor - batch.offset + 1];
  if (next) new Image().src = cropUrl(next);  // fetched while this one is looked at: cached for the next
  $("info").textContent = `${field.file} page ${field.page} field ${field.field}: read "${field.digits}"` +
    `, confidence ${field.confidence}; ${field.flag_reason}` +
    (field.review_status ? `; saved: ${field.review_status} ${field.reviewed_digits}` : "");
  $("digits").value = field.reviewed_digits || "";
  $("digits").placeholder = field.digits;
  $("digits").focus();
}

function cropUrl(field) { return `api/crop/${field.index}?token=${encodeURIComponent(token)}`; }

// Each digit read: its box on the crop, and under it the digit and its confidence.
function drawDigits(field) {
  if (field !== current()) return;  // a late image of a field already left
  const crop = $("crop");
  const scale = crop.naturalWidth ? crop.clientWidth / crop.naturalWidth : 1;
  const marks = [];
  for (const d of field.digits_read) {
    const box = document.createElement("div");
    box.className = "box";
    Object.assign(box.style, {left: `${d.x * scale + 1}px`, top: `${d.y * scale + 1}px`,
      width: `${d.width * scale}px`, height: `${d.height * scale}px`});
    const read = document.createElement("div");
    read.className = "read" + (Number(d.confidence) < LOW_CONFIDENCE ? " low" : "");
    read.style.left = `${d.x * scale}px`;
    read.style.minWidth = `${d.width * scale}px`;
    const digit = document.createElement("b");
    digit.textContent = d.digit;
    read.append(digit, Number(d.confidence).toFixed(2));
    marks.push(box, read);
  }
  $("marks").replaceChildren(...marks);
  $("view").dataset.shown = String(field.index);
}

async function save(status, digits) {
  const field = current();
  if (!field) return;
  const started = performance.now();
  const row = await api("api/review", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({index: field.index, digits: digits, status: status})});
  reviewTimings.saves.push(performance.now() - started);
  field.review_status = row.status; field.reviewed_digits = row.digits;
  $("status").textContent = `saved ${row.file} page ${row.page} field ${row.field}: ${row.status} ${row.digits}`;
  await load(cursor + 1);
}

$("digits").addEventListener("keydown", async (event) => {
  const field = current();
  try {
    if (event.key === "Enter") {
      event.preventDefault();
      const typed = $("digits").value.trim();
      if (!field) return;
      if (typed === "" || typed === field.digits) await save("accepted", field.digits);
      else await save("corrected", typed);
    } else if (event.ctrlKey && "sbnu".includes(event.key)) {
      event.preventDefault();
      if (event.key === "s") await load(cursor + 1);
      else if (event.key === "b") await load(cursor - 1);
      else if (event.key === "n") await save("not_a_field", "");
      else await save("unreadable", "");
    }
  } catch (error) { $("status").textContent = "not saved: " + error.message; }
});

load(0).catch((error) => { $("status").textContent = error.message; });
