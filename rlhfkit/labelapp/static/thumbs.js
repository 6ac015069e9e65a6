// Thumbs page: keyboard shortcuts on top of a plain form (which works without this script).
// It only checks radio buttons and moves focus; model text is never touched.
(function () {
  "use strict";
  const root = document.querySelector(".thumbs-page");
  if (!root) return;
  const form = document.getElementById("thumbs-form");
  const statusEl = document.getElementById("status");
  const criteria = JSON.parse(root.dataset.criteria);
  let active = criteria[0];
  let sent = false;

  const cards = () => Array.from(document.querySelectorAll("#replies > li"));

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", !!isError);
  }

  function unjudged() {
    return cards().filter((li) => criteria.some((c) =>
      !li.querySelector(`fieldset[data-criterion="${c}"] input:checked`))).length;
  }

  function refresh() {
    const left = unjudged();
    setStatus(left ? `${left} repl${left === 1 ? "y" : "ies"} still need a thumb.` : "Every reply has its thumb: submit.");
  }

  function switchCriterion(name) {
    active = name;
    document.querySelectorAll(".thumb-row").forEach((f) => f.classList.toggle("active", f.dataset.criterion === name));
    setStatus(`Thumbs for ${name}.`);
  }

  function thumb(li, value) {
    const input = li.querySelector(`fieldset[data-criterion="${active}"] input[value="${value}"]`);
    input.checked = true;
    const all = cards();
    (all[all.indexOf(li) + 1] || li).focus();
    refresh();
  }

  form.addEventListener("change", refresh);
  // Back from an error page (kept in the browser's cache): the form may be sent again (same client id).
  window.addEventListener("pageshow", () => { sent = false; });
  form.addEventListener("submit", (e) => {
    if (sent) { e.preventDefault(); return; } // one post per page: a second click must not race the first
    sent = true;
    setStatus("Saving…");
  });

  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (form.reportValidity()) form.requestSubmit();
      return;
    }
    const tag = (e.target.tagName || "").toLowerCase();
    if (tag === "textarea" || tag === "select" || (tag === "input" && e.target.type !== "radio")) return;
    if (e.key === "[" || e.key === "]") {
      const i = criteria.indexOf(active) + (e.key === "]" ? 1 : -1);
      if (i >= 0 && i < criteria.length) switchCriterion(criteria[i]);
      return;
    }
    const all = cards();
    const li = e.target.closest ? e.target.closest("#replies > li") : null;
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      if (!li) { all[0].focus(); return; }
      (all[all.indexOf(li) + (e.key === "ArrowUp" ? -1 : 1)] || li).focus();
    } else if (li && (e.key === "u" || e.key === "U" || e.key === "+")) {
      e.preventDefault();
      thumb(li, "up");
    } else if (li && (e.key === "d" || e.key === "D" || e.key === "-")) {
      e.preventDefault();
      thumb(li, "down");
    }
  });

  refresh();
})();
