"use strict";
// The review page: one tile at a time, most suspicious first. Every action goes through one chain of
// promises, so fast key presses apply in order, each to the tile the previous one moved to.

const $ = (id) => document.getElementById(id);
const view = { suspects: [], decisions: {}, classes: [], unusable: "unusable", queue: [], pos: 0, total: 0 };
let chain = Promise.resolve();

function run(action) {
  chain = chain.then(action).catch((error) => say(error.message || String(error)));
  return chain;
}

function say(text, ok = false) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}

function isDecided(suspect) {
  return Object.prototype.hasOwnProperty.call(view.decisions, String(suspect.id));
}

function firstUndecided(from) {
  for (let i = from; i < view.queue.length; i++) if (!isDecided(view.queue[i])) return i;
  for (let i = 0; i < from && i < view.queue.length; i++) if (!isDecided(view.queue[i])) return i;
  return -1;
}

function applyFilters() {
  const given = $("filter-given").value;
  const suggested = $("filter-suggested").value;
  const disagree = $("filter-disagree").checked;
  view.queue = view.suspects.filter(
    (s) => (!given || s.given === given) && (!suggested || s.suggested === suggested) && (!disagree || s.given !== s.suggested),
  );
  const next = firstUndecided(0);
  view.pos = next >= 0 ? next : Math.max(0, view.queue.length - 1);
  render();
}

function current() {
  return view.queue[view.pos];
}

function render() {
  const reviewedHere = view.queue.filter(isDecided).length;
  const reviewed = Object.keys(view.decisions).length;
  $("progress").textContent =
    `reviewed ${reviewed} / ${view.total}` + (view.queue.length !== view.total ? ` · this filter ${reviewedHere} / ${view.queue.length}` : "");
  const s = current();
  const tileView = $("tile-view");
  if (!s) {
    tileView.hidden = true;
    $("queue").replaceChildren();
    say("No tile matches these filters.");
    return;
  }
  tileView.hidden = false;
  $("tile").src = `/api/tiles/${s.id}/image`;
  $("tile").dataset.id = s.id;
  $("context-figure").hidden = !s.context;
  if (s.context) $("context").src = `/api/tiles/${s.id}/context`;
  $("rank").textContent = s.id + 1;
  $("score").textContent = s.score.toFixed(3);
  $("given").textContent = s.given;
  $("suggested").textContent = s.suggested;
  $("position").textContent = `${view.pos + 1} of ${view.queue.length} in this filter`;
  const d = view.decisions[String(s.id)];
  $("decision").textContent = d
    ? `decided: ${d.decided}${d.decided === s.given ? " (kept)" : ""} — ${d.who}, ${d.when}`
    : firstUndecided(0) < 0 ? "every tile in this filter is decided" : "";
  const rows = view.classes.map((name, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.decide = name;
    const p = s.probs ? s.probs[i] : null;
    button.innerHTML =
      `<span>${i < 9 ? `<kbd>${i + 1}</kbd>` : ""}</span><span></span>` +
      `<span class="bar"><span style="width:${p === null ? 0 : (100 * p).toFixed(1)}%"></span></span>` +
      `<span class="num">${p === null ? "–" : p.toFixed(2)}</span>`;
    button.children[1].textContent = name;
    button.classList.toggle("is-given", name === s.given);
    button.classList.toggle("is-suggested", name === s.suggested);
    button.classList.toggle("is-decided", !!d && d.decided === name);
    return button;
  });
  $("classes").replaceChildren(...rows);
  renderQueue();
  const following = view.queue[view.pos + 1];
  if (following) new Image().src = `/api/tiles/${following.id}/image`; // the next tile shows at once
}

function renderQueue() {
  const items = view.queue.slice(view.pos, view.pos + 14).map((s, k) => {
    const li = document.createElement("li");
    li.className = k === 0 ? "current" : "";
    li.dataset.pos = view.pos + k;
    const img = document.createElement("img");
    img.src = `/api/tiles/${s.id}/image`;
    img.alt = "";
    img.loading = "lazy";
    const text = document.createElement("span");
    text.textContent = `#${s.id + 1} ${s.given} → ${s.suggested}`;
    li.append(img, text);
    if (isDecided(s)) {
      const done = document.createElement("span");
      done.className = "done";
      done.textContent = "✓";
      li.append(done);
    }
    return li;
  });
  $("queue").replaceChildren(...items);
}

async function decide(decided) {
  const s = current();
  if (!s) return;
  const who = $("who").value.trim();
  if (!who) {
    $("who").focus();
    throw new Error("Type your name in the Reviewer field first: each decision records who took it.");
  }
  const response = await fetch("/api/decisions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ tile: s.id, decided, who }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `saving failed (HTTP ${response.status})`);
  view.decisions[String(s.id)] = { decided: body.decided, who: body.who, when: body.when };
  say("");
  const next = firstUndecided(view.pos + 1);
  if (next >= 0) view.pos = next;
  render();
}

async function undo() {
  const s = current();
  if (!s || !isDecided(s)) return;
  const response = await fetch(`/api/decisions/${s.id}`, { method: "DELETE" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `undo failed (HTTP ${response.status})`);
  delete view.decisions[String(s.id)];
  render();
}

function move(step) {
  view.pos = Math.min(Math.max(0, view.pos + step), Math.max(0, view.queue.length - 1));
  render();
}

function act(action) {
  // the tile is looked up when the action runs: after the actions queued before it
  if (action === "accept") return run(() => current() && decide(current().suggested));
  if (action === "keep") return run(() => current() && decide(current().given));
  if (action === "unusable") return run(() => decide(view.unusable));
  if (action === "prev") return run(() => move(-1));
  if (action === "next") return run(() => move(1));
  if (action === "undo") return run(undo);
}

const KEYS = { a: "accept", k: "keep", u: "unusable", ArrowLeft: "prev", ArrowRight: "next", Backspace: "undo", Delete: "undo" };

document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (KEYS[key]) {
    event.preventDefault();
    act(KEYS[key]);
  } else if (/^[1-9]$/.test(key) && Number(key) <= view.classes.length) {
    event.preventDefault();
    const name = view.classes[Number(key) - 1];
    run(() => decide(name));
  }
});

document.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (button && button.dataset.action) act(button.dataset.action);
  else if (button && button.dataset.decide) {
    const name = button.dataset.decide;
    run(() => decide(name));
  }
  const item = event.target.closest("#queue li");
  if (item) run(() => move(Number(item.dataset.pos) - view.pos));
});

async function start() {
  const response = await fetch("/api/state");
  const state = await response.json();
  if (!response.ok) throw new Error(state.error || `could not load the run (HTTP ${response.status})`);
  Object.assign(view, {
    suspects: state.suspects,
    decisions: state.decisions,
    classes: state.classes,
    unusable: state.unusable,
    total: state.suspects.length,
  });
  $("run").textContent = state.run;
  document.title = `Review ${state.run}`;
  for (const id of ["filter-given", "filter-suggested"]) {
    for (const name of state.classes) $(id).append(new Option(name, name));
    $(id).addEventListener("change", () => {
      $(id).blur(); // the keys act on the tiles again at once
      run(applyFilters);
    });
  }
  $("filter-disagree").addEventListener("change", () => {
    $("filter-disagree").blur();
    run(applyFilters);
  });
  $("who").value = localStorage.getItem("histo-review-who") || state.who || "";
  $("who").addEventListener("change", () => localStorage.setItem("histo-review-who", $("who").value.trim()));
  // Enter or Escape in a field hands the keys back to the page
  for (const field of document.querySelectorAll("input, select")) {
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === "Escape") field.blur();
    });
  }
  $("changes-link").hidden = !state.retrained;
  applyFilters();
  document.body.dataset.ready = "true";
}

run(start);
