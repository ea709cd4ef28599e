"use strict";
// What the dashboard (/) and the console (/console) share. Everything from the server is
// put on the page as text (textContent), never as HTML: payloads, errors and names are
// user data.

const $ = (sel) => document.querySelector(sel);

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

// Fills a table's body with a row per item; redrawn only when the items changed, so a
// row (a link, a button) is not replaced under the pointer for nothing.
function fill(tableId, items, render, emptyText) {
  const body = document.querySelector("#" + tableId + " tbody");
  const drawn = JSON.stringify([items || [], emptyText || ""]);
  if (body.dataset.drawn === drawn) return;
  body.dataset.drawn = drawn;
  body.replaceChildren();
  if (!items || items.length === 0) {
    const row = body.insertRow();
    const td = cell(row, emptyText || "none", "empty");
    td.colSpan = document.querySelectorAll("#" + tableId + " thead th").length;
    return;
  }
  for (const item of items) render(body.insertRow(), item);
}

function age(ms) {
  if (ms === null || ms === undefined) return "-";
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function when(text) { return text ? text.replace("T", " ").replace(/\.\d+Z$/, "Z") : "-"; }

function element(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

// The API's answer as JSON; a refusal throws its one-line error.
async function answer(response) {
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function get(path) { return answer(await fetch(path)); }

async function post(path, body) {
  return answer(await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  }));
}

function say(text) { $("#message").textContent = text; }

// Follows /api/live: `render` gets every snapshot whose database read worked; the status
// line says live or why not. EventSource reconnects by itself after a server restart.
function followLive(render) {
  const live = new EventSource("/api/live");
  live.addEventListener("overview", (e) => {
    const o = JSON.parse(e.data);
    const status = $("#status");
    if (!o.database || !o.database.ok) {
      status.textContent = "database unavailable: " + ((o.database && o.database.error) || "unknown") + " (retrying)";
      status.className = "down";
      return;
    }
    status.textContent = "live · " + when(o.at);
    status.className = "";
    render(o);
  });
  live.onerror = () => { const s = $("#status"); s.textContent = "disconnected: reconnecting…"; s.className = "down"; };
  return live;
}
