"use strict";
const $ = (id) => document.getElementById(id);

function format(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}

async function start() {
  const response = await fetch("/api/changes");
  const data = await response.json();
  if (!response.ok) {
    $("message").textContent = data.error || `HTTP ${response.status}`;
    $("message").hidden = false;
    return;
  }
  $("runs").textContent = `${data.before} → ${data.after}`;
  const rows = data.metrics.map((m) => {
    const tr = document.createElement("tr");
    const delta = m.after - m.before;
    for (const [text, cls] of [
      [m.name, ""],
      [format(m.before), "n"],
      [format(m.after), "n"],
      [(delta > 0 ? "+" : "") + format(delta), "n"],
      [m.note, "muted"],
    ]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  $("metrics").tBodies[0].replaceChildren(...rows);
  const c = data.corrections;
  $("applied").textContent = c
    ? `Corrections applied: ${c.relabelled} relabelled, ${c.confirmed} confirmed, ${c.unusable_dropped} unusable tiles dropped.`
    : "The retrained run applied no corrections.";
  $("changed-title").textContent = `Tiles whose prediction changed (${data.changed.length} of ${data.n_compared})`;
  const cards = data.changed.map((t, index) => {
    const card = document.createElement("div");
    card.className = "card" + (t.decided && t.decided === t.after ? " agrees" : "");
    card.dataset.id = t.id;
    const img = document.createElement("img");
    img.src = `/api/tiles/${t.id}/image`;
    img.alt = "";
    img.loading = index < 24 ? "eager" : "lazy"; // the first screenful at once
    const text = document.createElement("div");
    text.textContent =
      `#${t.id + 1}: ${t.before} → ${t.after}; given ${t.given}` + (t.decided ? `, decided ${t.decided}` : "");
    card.append(img, text);
    return card;
  });
  $("changed").replaceChildren(...cards);
  document.body.dataset.ready = "true";
}

start();
