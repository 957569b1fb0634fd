// Small DOM helpers: elements are built with text nodes, never from HTML strings.

export const $ = (selector, root = document) => root.querySelector(selector);

/** h("td", {class: "x"}, "text", child): an element with attributes and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace a select's options, keeping the chosen value when it is still offered. */
export function fillSelect(select, options, keepFirst = 0) {
  const chosen = select.value;
  while (select.options.length > keepFirst) select.remove(keepFirst);
  for (const option of options) {
    const [value, label] = Array.isArray(option) ? option : [option, option];
    select.append(h("option", { value }, label));
  }
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

export function statusBadge(status) {
  return h("span", { class: "status", "data-status": status }, status);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

/** Show a message to everyone, screen readers included; errors stay until replaced. */
export function notify(message, isError = false) {
  const box = $("#notice");
  box.textContent = message;
  box.classList.toggle("error", isError);
  box.hidden = !message;
}
