// The console's shell: who is signed in, which pages they may see, and the hash router.

import { api, ApiError, session } from "./api.js";
import { $, notify } from "./dom.js";
import * as gallery from "./gallery.js";
import * as models from "./models.js";
import * as operations from "./operations.js";
import * as playground from "./playground.js";

const PAGES = { playground, gallery, models, operations };
const state = { admin: false, signedIn: false, current: null };

/** Who the gateway takes us for: probes an authenticated route, then an admin-only one. */
async function whoAmI() {
  try {
    await api("GET", "/tasks?limit=1");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return false;
    throw error;
  }
  try {
    await api("GET", "/list/sdapi/functions");
    state.admin = true;
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 403) throw error;
    state.admin = false;
  }
  return true;
}

function showPage(name) {
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== `page-${name}`;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function route() {
  if (!state.signedIn) {
    showPage("signin");
    return;
  }
  let name = location.hash.slice(1) || "playground";
  if (!(name in PAGES) || (name === "operations" && !state.admin)) name = "playground";
  if (state.current && state.current !== name) PAGES[state.current].leave?.();
  state.current = name;
  showPage(name);
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · sdswarm`;
  try {
    await PAGES[name].enter({ admin: state.admin });
  } catch (error) {
    // A 401 sends the user back to sign in ("sdswarm:unauthorized"), which says so.
    if (!(error instanceof ApiError && error.status === 401)) notify(error.message, true);
  }
}

async function start() {
  notify("");
  state.signedIn = await whoAmI();
  $("#nav").hidden = !state.signedIn;
  $("#nav-operations").hidden = !state.admin;
  document.body.classList.toggle("is-admin", state.admin);
  $("#sign-out").hidden = !(state.signedIn && session.token);
  $("#who").textContent = state.signedIn
    ? `${session.user || "local user"}${state.admin ? " (administrator)" : ""}`
    : "";
  await route();
  if (!state.signedIn) $("#login-form [name=userName]").focus();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const answer = await api("POST", "/login", {
      userName: form.get("userName"),
      password: form.get("password"),
    });
    session.set(answer.token, answer.userName);
    event.target.reset();
    await start();
  } catch (error) {
    notify(`Sign-in failed: ${error.message}`, true);
  }
});

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  session.set(new FormData(event.target).get("key"), "API key");
  event.target.reset();
  await start();
  if (!state.signedIn) {
    session.clear();
    notify("That API key was not accepted.", true);
  }
});

$("#sign-out").addEventListener("click", async () => {
  if (state.current) PAGES[state.current].leave?.();
  state.current = null;
  session.clear();
  location.hash = "";
  await start();
});

window.addEventListener("hashchange", () => route());
window.addEventListener("sdswarm:unauthorized", async () => {
  if (!state.signedIn) return;
  if (state.current) PAGES[state.current].leave?.();
  state.current = null;
  session.clear();
  await start();
  notify("Your session has ended: please sign in again.", true);
});
start().catch((error) => notify(error.message, true));
