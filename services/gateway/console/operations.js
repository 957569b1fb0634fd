// Operations (administrators): worker pools per checkpoint, workers, dead letters, webhooks.

import { api } from "./api.js";
import { $, h, notify, statusBadge, when } from "./dom.js";

const POLL_MS = 3000;
let timer = null;
/** Edited values are not redrawn away before they are saved. */
let editing = false;

function field(fn, name, label, value, min) {
  return h("input", {
    type: "number", name, min, value: value ?? "", size: 5,
    "aria-label": `${label} of ${fn.model}`,
    placeholder: "default",
    oninput: () => { editing = true; },
  });
}

async function save(fn, row) {
  const body = { models: [fn.model] };
  for (const [name, parse] of [["minInstances", Number], ["maxInstances", Number], ["idleTimeout", Number], ["maxBatch", Number]]) {
    const value = row.querySelector(`[name=${name}]`).value;
    if (value !== "") body[name] = parse(value);
  }
  await api("POST", "/batch_update_sd_resource", body);
  $("#ops-status").textContent = `saved ${fn.functionName}`;
  editing = false;
  await refresh(true);
}

async function functions() {
  const { functions: pools } = await api("GET", "/list/sdapi/functions");
  const total = pools.reduce((sum, fn) => sum + fn.share, 0);
  $("#functions-table tbody").replaceChildren(...pools.map((fn) => {
    const row = h("tr", { "data-function": fn.functionName, "data-model": fn.model },
      h("th", { scope: "row" }, fn.functionName, h("br"), h("small", {}, fn.model)),
      h("td", {}, statusBadge(fn.state)),
      h("td", {}, fn.backlog),
      h("td", {}, fn.running),
      h("td", {}, fn.replicas),
      h("td", {}, total ? `${fn.share} (${Math.round((100 * fn.share) / total)}%)` : String(fn.share)),
      h("td", {}, fn.coldStartSeconds ? `${fn.coldStartSeconds.toFixed(1)} s` : "—"),
      h("td", {}, field(fn, "minInstances", "Minimum instances", fn.minInstances, 0)),
      h("td", {}, field(fn, "maxInstances", "Maximum instances", fn.maxInstances, 1)),
      h("td", {}, field(fn, "idleTimeout", "Idle timeout", fn.idleTimeout, 0)),
      h("td", {}, field(fn, "maxBatch", "Max batch", fn.maxBatch, 1)),
    );
    row.append(h("td", {}, h("button", {
      type: "button", "aria-label": `Save ${fn.model}`,
      onclick: () => save(fn, row).catch((error) => notify(error.message, true)),
    }, "Save")));
    return row;
  }));
}

function rowsOrEmpty(rows, columns, empty) {
  return rows.length ? rows : [h("tr", {}, h("td", { colspan: columns }, empty))];
}

async function others() {
  const [memory, dead, hooks] = await Promise.all([
    api("GET", "/sdapi/v1/memory"),
    api("GET", "/deadletters?limit=20"),
    api("GET", "/webhooks/failures"),
  ]);
  $("#workers-table tbody").replaceChildren(...rowsOrEmpty((memory.workers || []).map((w) => h("tr", {},
    h("td", { class: "mono" }, w.worker), h("td", {}, w.model), h("td", {}, statusBadge(w.state)),
    h("td", {}, w.rss ? `${(w.rss / 2 ** 20).toFixed(0)} MiB` : ""),
  )), 4, "No workers running (pools scale to zero when idle)."));
  $("#dead-table tbody").replaceChildren(...rowsOrEmpty(dead.map((d) => h("tr", {},
    h("td", {}, when(d.at)), h("td", { class: "mono" }, d.taskId || "?"),
    h("td", {}, d.advisory), h("td", {}, d.deliveries),
  )), 4, "No dead letters."));
  $("#hooks-table tbody").replaceChildren(...rowsOrEmpty(hooks.map((f) => h("tr", {},
    h("td", {}, when(f.at)), h("td", { class: "mono" }, f.taskId), h("td", {}, f.event), h("td", {}, f.error),
  )), 4, "No failed webhook deliveries."));
}

async function refresh(force = false) {
  if (!editing || force) await functions();
  await others();
}

export async function enter() {
  await refresh(true);
  clearInterval(timer);
  timer = setInterval(() => refresh().catch(() => {}), POLL_MS);
}

export function leave() {
  clearInterval(timer);
  timer = null;
}

$("#restart").addEventListener("click", async () => {
  if (!confirm("Restart every worker, one after another? No task is lost.")) return;
  try {
    await api("POST", "/restart");
    $("#ops-status").textContent = "rolling restart requested";
  } catch (error) {
    notify(error.message, true);
  }
});
