"use strict";
const token = new URLSearchParams(location.search).get("token");
const LIMIT = 50;
let batch = {offset: 0, total: 0, fields: []};
let cursor = 0;  // position among all fields
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const sep = path.includes("?") ? "&" : "?";
  const response = await fetch(path + sep + "token=" + encodeURIComponent(token), options);
  if (!response.ok) throw new Error(response.status + " " + (await response.text()));
  return response.json();
}

async function load(position) {
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
  if (!field) { $("info").textContent = "All fields shown."; $("crop").removeAttribute("src"); return; }
  $("crop").src = `api/crop/${field.index}?token=${encodeURIComponent(token)}`;
  const per = field.digit_confidences.length ? " (" + field.digit_confidences.join(", ") + ")" : "";
  $("info").textContent = `${field.file} page ${field.page} field ${field.field}: read "${field.digits}"` +
    `, confidence ${field.confidence}${per}; ${field.flag_reason}` +
    (field.review_status ? `; saved: ${field.review_status} ${field.reviewed_digits}` : "");
  $("digits").value = field.reviewed_digits || "";
  $("digits").placeholder = field.digits;
  $("digits").focus();
}

async function save(status, digits) {
  const field = current();
  if (!field) return;
  const row = await api("api/review", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({index: field.index, digits: digits, status: status})});
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
