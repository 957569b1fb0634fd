// Models: the registry by type with true statuses; upload, register from the store, delete.

import { api, upload } from "./api.js";
import { $, fillSelect, h, notify, statusBadge } from "./dom.js";

const TYPES = [
  ["stableDiffusion", "Checkpoints"], ["lora", "LoRAs"], ["embedding", "Embeddings"],
  ["sdVae", "VAEs"], ["controlNet", "ControlNets"], ["upscaler", "Upscalers"],
  ["faceRestorer", "Face restorers"], ["vaeApprox", "Preview decoders (TAESD)"],
];
const POLL_MS = 2000;
let timer = null;
let admin = false;

function size(bytes) {
  if (!bytes) return "";
  const mib = bytes / 2 ** 20;
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(1)} MiB`;
}

function describe(model) {
  if (model.status === "failed") return model.error || "failed";
  if (model.draining) return "draining: deleted once its queue is empty";
  if (model.status === "loaded") return `${model.loadedWorkers} worker(s)`;
  if (model.status === "unloaded" && model.type === "stableDiffusion") return "ready: a worker starts on demand";
  if (model.status === "registering") return "copying and checking the file…";
  return "";
}

async function remove(model) {
  if (!confirm(`Delete ${model.name}? Queued tasks run first (drain).`)) return;
  const query = new URLSearchParams({ type: model.type, drain: "true" });
  await api("DELETE", `/models/${encodeURIComponent(model.name)}?${query}`);
  await refresh();
}

async function refresh() {
  const models = await api("GET", "/models");
  const sections = TYPES.map(([type, title]) => {
    const rows = models.filter((m) => m.type === type && m.status !== "deleted");
    if (!rows.length) return null;
    return h("div", { class: "table-wrap" },
      h("table", { "data-type": type },
        h("caption", {}, title),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, "Details"), h("th", { scope: "col" }, "Family"),
          h("th", { scope: "col" }, "Size"),
          admin ? h("th", { scope: "col" }, h("span", { class: "sr" }, "Actions")) : null)),
        h("tbody", {}, rows.map((m) => h("tr", { "data-model": m.name },
          h("th", { scope: "row" }, m.name),
          h("td", {}, statusBadge(m.status)),
          h("td", {}, describe(m)),
          h("td", {}, m.family || ""),
          h("td", {}, size(m.sizeBytes)),
          admin ? h("td", {}, h("button", {
            type: "button", disabled: m.draining,
            "aria-label": `Delete ${m.name}`,
            onclick: () => remove(m).catch((error) => notify(error.message, true)),
          }, "Delete")) : null,
        ))),
      ));
  });
  $("#models-lists").replaceChildren(...sections.filter(Boolean));
}

export async function enter(context) {
  admin = context.admin;
  for (const select of document.querySelectorAll(".model-types")) fillSelect(select, TYPES);
  await refresh();
  clearInterval(timer);
  timer = setInterval(() => refresh().catch(() => {}), POLL_MS);
}

export function leave() {
  clearInterval(timer);
  timer = null;
}

$("#upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const file = form.elements.file.files[0];
  const name = form.elements.name.value.trim();
  const status = $("#upload-status");
  const bar = $("#upload-progress");
  const query = new URLSearchParams({ type: form.elements.type.value });
  bar.value = 0;
  status.textContent = "uploading…";
  try {
    await upload(`/models/${encodeURIComponent(name)}?${query}`, file, (f) => { bar.value = Math.round(f * 100); });
    bar.value = 100;
    status.textContent = `${name} uploaded`;
    await refresh();
  } catch (error) {
    status.textContent = `upload failed: ${error.message}`;
  }
});

$("#register-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = { type: form.elements.type.value, ossPath: form.elements.ossPath.value.trim() };
  if (form.elements.name.value.trim()) body.name = form.elements.name.value.trim();
  try {
    const answer = await api("POST", "/models", body);
    $("#register-status").textContent = answer.message;
    await refresh();
  } catch (error) {
    $("#register-status").textContent = `registration failed: ${error.message}`;
  }
});
