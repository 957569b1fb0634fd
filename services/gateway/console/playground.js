// The playground: build a txt2img/img2img request, submit it async, follow it over SSE.

import { api, fileToBase64, follow } from "./api.js";
import { $, fillSelect, h, notify } from "./dom.js";
import { Painter } from "./painter.js";

const form = $("#gen-form");
const PREVIEW_MS = 1000;
const painter = new Painter($("#painter"), $("#init-canvas"), $("#mask-canvas"), $("#brush"));
/** The input image of img2img: base64 of a chosen file, or the object key of a result. */
let init = null;
/** The task being followed: its id and the controller that stops following it. */
let running = null;
let lastBody = null;
let lastResult = null;
let listsLoaded = false;

const number = (name) => Number(form.elements[name].value);
const mode = () => form.elements.mode.value;

async function optional(path, fallback) {
  try { return await api("GET", path); } catch { return fallback; }
}

async function loadLists() {
  const checkpoints = await api("GET", "/models?type=stableDiffusion");
  const usable = checkpoints.filter((m) => !m.draining && !["failed", "deleted"].includes(m.status));
  fillSelect(form.elements.stable_diffusion_model, usable.map((m) => [m.name, `${m.name} (${m.status})`]));
  if (listsLoaded) return;
  const [samplers, schedulers, styles, loras, embeddings, upscalers, cnModules, cnModels] =
    await Promise.all([
      optional("/sdapi/v1/samplers", []),
      optional("/sdapi/v1/schedulers", []),
      optional("/sdapi/v1/prompt-styles", []),
      optional("/sdapi/v1/loras", []),
      optional("/sdapi/v1/embeddings", { loaded: {} }),
      optional("/sdapi/v1/upscalers", []),
      optional("/controlnet/module_list", { module_list: [] }),
      optional("/controlnet/model_list", { model_list: [] }),
    ]);
  fillSelect(form.elements.sampler_name, samplers.map((s) => s.name));
  fillSelect(form.elements.scheduler, [["", "Automatic"], ...schedulers.map((s) => [s.name, s.label])]);
  fillSelect(form.elements.styles, styles.map((s) => s.name));
  fillSelect($("#network"), [
    ...loras.map((l) => [`<lora:${l.alias || l.name}:1>`, `LoRA: ${l.alias || l.name}`]),
    ...Object.keys(embeddings.loaded || {}).map((n) => [n, `Embedding: ${n}`]),
  ]);
  $("#insert-network").disabled = !$("#network").options.length;
  fillSelect(form.elements.hr_upscaler, [["", "Default"], ...upscalers.map((u) => u.name)]);
  fillSelect(form.elements.cn_module, cnModules.module_list || []);
  fillSelect(form.elements.cn_model, cnModels.model_list || []);
  listsLoaded = true;
}

export async function enter() {
  await loadLists();
}

async function buildBody() {
  const body = {
    stable_diffusion_model: form.elements.stable_diffusion_model.value,
    prompt: form.elements.prompt.value,
    negative_prompt: form.elements.negative_prompt.value,
    styles: [...form.elements.styles.selectedOptions].map((o) => o.value),
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    cfg_scale: number("cfg_scale"),
    seed: number("seed"),
    batch_size: number("batch_size"),
    n_iter: number("n_iter"),
  };
  if (!form.elements.previews.checked) {
    // A1111's option (0: no previews) for this request only (restored afterwards); unset,
    // workers preview about once a second.
    body.override_settings = { show_progress_every_n_steps: 0 };
  }
  if (form.elements.sampler_name.value) body.sampler_name = form.elements.sampler_name.value;
  if (form.elements.scheduler.value) body.scheduler = form.elements.scheduler.value;
  if (form.elements.cn_enabled.checked) {
    const file = $("#cn-file").files[0];
    if (!file) throw new Error("ControlNet needs a control image");
    body.alwayson_scripts = {
      controlnet: {
        args: [{
          enabled: true,
          module: form.elements.cn_module.value || "none",
          model: form.elements.cn_model.value || "None",
          weight: number("cn_weight"),
          image: await fileToBase64(file),
        }],
      },
    };
  }
  if (mode() === "img2img") {
    if (!init) throw new Error("img2img needs an input image");
    body.init_images = [init];
    body.denoising_strength = number("denoising_strength");
    const mask = painter.toBase64();
    if (mask) body.mask = mask;
  } else if (form.elements.enable_hr.checked) {
    Object.assign(body, {
      enable_hr: true,
      hr_scale: number("hr_scale"),
      hr_second_pass_steps: number("hr_second_pass_steps"),
      denoising_strength: number("hr_denoising"),
    });
    if (form.elements.hr_upscaler.value) body.hr_upscaler = form.elements.hr_upscaler.value;
  }
  return body;
}

function setStatus(status, taskId = "") {
  const el = $("#task-status");
  el.textContent = status;
  el.dataset.status = status;
  $("#task-id").textContent = taskId;
  const busy = status === "waiting" || status === "running";
  $("#cancel").disabled = !busy;
  $("#generate").disabled = busy;
}

function setProgress(fraction, eta) {
  const percent = Math.round(fraction * 100);
  $("#progress").value = percent;
  $("#progress").textContent = `${percent}%`;
  $("#progress-text").textContent = `${percent}%`;
  $("#eta").textContent = eta ? `about ${Math.ceil(eta)} s left` : "";
}

async function submit(body) {
  lastBody = body;
  const path = mode() === "img2img" ? "/img2img" : "/txt2img";
  $("#images").replaceChildren();
  $("#infotext").hidden = true;
  $("#preview").hidden = true;
  $("#send-img2img").disabled = $("#rerun").disabled = true;
  setProgress(0, null);
  const answer = await api("POST", path, body, { "Request-Type": "async" });
  setStatus(answer.status, answer.taskId);
  watch(answer.taskId);
}

/** Follow a task's events; previews come from /progress, which signs their links. */
async function watch(taskId) {
  running?.controller.abort();
  const controller = new AbortController();
  running = { taskId, controller };
  // A preview keeps its object key while its picture changes: once one is announced,
  // re-read it at most once a second, at the next steps too; the store may not have
  // folded it in yet when the announcement comes, so an empty answer retries.
  let previewed = false;
  let previewBusy = false;
  let previewAt = 0;
  const showPreview = async () => {
    if (previewBusy || Date.now() - previewAt < PREVIEW_MS) return;
    previewBusy = true;
    previewAt = Date.now();
    try {
      const progress = await api("GET", `/tasks/${encodeURIComponent(taskId)}/progress`);
      if (progress.currentImageUrl && running?.taskId === taskId) {
        $("#preview").src = progress.currentImageUrl;
        $("#preview").hidden = false;
      }
    } finally {
      previewBusy = false;
    }
  };
  try {
    await follow(taskId, (name, data) => {
      if (running?.taskId !== taskId) return;
      if (name === "started") setStatus("running", taskId);
      else if (name === "progress") {
        setStatus("running", taskId);
        setProgress(data.progress ?? 0, data.eta_seconds);
        previewed ||= Boolean(data.preview_key);
        if (previewed) showPreview().catch(() => {});
      } else if (name === "succeeded") {
        setProgress(1, null);
        showResult(taskId).catch((error) => notify(error.message, true));
      } else if (name === "failed") {
        setStatus("failed", taskId);
        notify(`Task failed: ${data.message}`, true);
      } else if (name === "cancelled") {
        setStatus("cancelled", taskId);
      }
    }, controller.signal);
  } catch (error) {
    if (error.name !== "AbortError") notify(error.message, true);
  }
}

/** The result once the task document has it: the terminal event can arrive a moment
 * before the store has folded it in. */
async function finalResult(taskId) {
  for (let pause = 50; ; pause = Math.min(pause * 2, 1000)) {
    const result = await api("GET", `/tasks/${encodeURIComponent(taskId)}/result`);
    if (!["waiting", "running"].includes(result.status)) return result;
    await new Promise((resolve) => setTimeout(resolve, pause));
  }
}

async function showResult(taskId) {
  const result = await finalResult(taskId);
  lastResult = result;
  $("#preview").hidden = true;
  $("#images").replaceChildren(
    ...result.ossUrl.map((url, n) =>
      h("figure", {},
        h("img", { src: url, alt: `Result image ${n + 1} of task ${taskId}` }),
        h("figcaption", {}, h("a", { href: url, download: `${taskId}_${n}.png` }, `Download image ${n + 1}`)),
      ),
    ),
  );
  const info = result.info || {};
  const infotext = (info.infotexts && info.infotexts[0]) || "";
  $("#infotext").textContent = infotext;
  $("#infotext").hidden = !infotext;
  $("#reuse-seed").disabled = info.seed === undefined;
  $("#reuse-seed").dataset.seed = info.seed ?? "";
  $("#send-img2img").disabled = !result.images.length;
  $("#rerun").disabled = false;
  setStatus("succeeded", taskId);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  notify("");
  try {
    await submit(await buildBody());
  } catch (error) {
    setStatus("idle");
    notify(error.message, true);
  }
});

$("#cancel").addEventListener("click", async () => {
  if (!running) return;
  try {
    await api("POST", `/tasks/${encodeURIComponent(running.taskId)}/cancellation`);
  } catch (error) {
    notify(error.message, true);
  }
});

for (const radio of form.elements.mode) {
  radio.addEventListener("change", () => { $("#img2img-box").hidden = mode() !== "img2img"; });
}

$("#init-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  init = await fileToBase64(file);
  const url = URL.createObjectURL(file);
  try {
    const size = await painter.load(url);
    form.elements.width.value = size.width;
    form.elements.height.value = size.height;
  } finally {
    URL.revokeObjectURL(url);
  }
});

$("#send-img2img").addEventListener("click", async () => {
  if (!lastResult) return;
  init = lastResult.images[0]; // an object key of the caller's: no bytes travel
  form.elements.mode.value = "img2img";
  $("#img2img-box").hidden = false;
  const size = await painter.load(lastResult.ossUrl[0]);
  form.elements.width.value = size.width;
  form.elements.height.value = size.height;
  form.elements.prompt.focus();
});

$("#rerun").addEventListener("click", () => {
  if (lastBody) submit(lastBody).catch((error) => notify(error.message, true));
});
$("#reuse-seed").addEventListener("click", (event) => { form.elements.seed.value = event.target.dataset.seed; });
$("#random-seed").addEventListener("click", () => { form.elements.seed.value = -1; });
$("#mask-all").addEventListener("click", () => painter.fill());
$("#mask-clear").addEventListener("click", () => painter.clear());
$("#insert-network").addEventListener("click", () => {
  const tag = $("#network").value;
  const prompt = form.elements.prompt;
  prompt.value = prompt.value ? `${prompt.value.trimEnd()} ${tag}` : tag;
  prompt.focus();
});
