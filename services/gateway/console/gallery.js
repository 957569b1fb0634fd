// The gallery: the caller's tasks (GET /tasks), newest first, filtered and paged by cursor.

import { api } from "./api.js";
import { $, fillSelect, h, notify, statusBadge, when } from "./dom.js";

const PAGE = 12;
const filter = $("#gallery-filter");
/** Cursors of the pages shown so far: the first page has none. */
let cursors = [null];

async function load() {
  const query = new URLSearchParams({ limit: String(PAGE) });
  const status = filter.elements.status.value;
  const model = filter.elements.model.value;
  if (status) query.set("status", status);
  if (model) query.set("model", model);
  const cursor = cursors[cursors.length - 1];
  if (cursor) query.set("cursor", cursor);
  const page = await api("GET", `/tasks?${query}`);
  const rows = page.tasks.map((task) =>
    h("tr", {},
      h("td", {}, h("button", {
        type: "button", class: "link mono", "data-task": task.taskId,
        "aria-label": `Open task ${task.taskId}`, onclick: () => open(task),
      }, task.taskId)),
      h("td", {}, statusBadge(task.status)),
      h("td", {}, task.model),
      h("td", {}, task.kind),
      h("td", {}, when(task.createdTime)),
    ),
  );
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 5 }, "No tasks yet.")));
  $("#gallery-table tbody").replaceChildren(...rows);
  $("#gallery-next").disabled = !page.nextCursor;
  $("#gallery-next").dataset.cursor = page.nextCursor || "";
}

async function open(task) {
  const detail = $("#gallery-detail");
  const result = await api("GET", `/tasks/${encodeURIComponent(task.taskId)}/result`);
  const parameters = Object.entries(result.parameters || {}).filter(([, v]) => typeof v !== "object");
  detail.replaceChildren(
    h("h2", {}, `Task ${task.taskId}`),
    h("p", {}, statusBadge(result.status), " ", result.message || ""),
    result.code ? h("p", {}, `Reason: ${result.code}`) : null,
    h("div", { class: "images" },
      result.ossUrl.map((url, n) => h("a", { href: url }, h("img", { src: url, alt: `Image ${n + 1} of task ${task.taskId}` })))),
    parameters.length
      ? h("dl", { class: "params" }, parameters.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]))
      : null,
  );
  detail.hidden = false;
  detail.focus();
}

export async function enter() {
  const models = await api("GET", "/models?type=stableDiffusion");
  fillSelect(filter.elements.model, models.map((m) => m.name), 1);
  cursors = [null];
  await load();
}

filter.addEventListener("submit", (event) => {
  event.preventDefault();
  cursors = [null];
  load().catch((error) => notify(error.message, true));
});
$("#gallery-first").addEventListener("click", () => {
  cursors = [null];
  load().catch((error) => notify(error.message, true));
});
$("#gallery-next").addEventListener("click", (event) => {
  cursors.push(event.target.dataset.cursor);
  load().catch((error) => notify(error.message, true));
});
