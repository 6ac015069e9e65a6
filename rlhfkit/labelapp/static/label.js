// Ranking page: drag-and-drop and keyboard reordering, ties, strengths, flags, submit with retry.
// Model text is never inserted as HTML here: the server renders it (escaped); this script only moves
// the existing <li> elements around and reads their data-position attributes.
(function () {
  "use strict";
  const root = document.getElementById("labeler");
  if (!root) return;
  const list = document.getElementById("ranking");
  const statusEl = document.getElementById("status");
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const assignmentId = Number(root.dataset.assignment);
  const criteria = JSON.parse(root.dataset.criteria);
  const askStrength = root.dataset.askStrength === "1";
  const strengthNames = JSON.parse(root.dataset.strengths);
  // One id per page load: a retry after a lost answer reuses it, so the server stores the ranking once.
  const clientId = newId();

  let active = criteria[0];
  // Every criterion starts from the shuffled display order, not from another criterion's ranking, so
  // one judgement does not anchor the next.
  const initialOrder = Array.from(list.children, (li) => ({ pos: Number(li.dataset.position), tied: false }));
  const orders = {};      // criterion -> [{pos, tied}] (saved when switching criterion)
  const strengths = {};   // criterion -> [strength between group g and g+1]
  const viewed = new Set([active]);

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = new Uint8Array(16);
    crypto.getRandomValues(b); // available outside secure contexts too (plain-http LAN servers)
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  const cards = () => Array.from(list.children);

  function readDom() {
    return cards().map((li) => ({ pos: Number(li.dataset.position), tied: li.dataset.tied === "1" }));
  }

  function applyOrder(order) {
    for (const { pos, tied } of order) {
      const li = list.querySelector(`li[data-position="${pos}"]`);
      li.dataset.tied = tied ? "1" : "0";
      list.appendChild(li);
    }
    refresh();
  }

  function groups(order) {
    const out = [];
    order.forEach(({ pos, tied }, i) => {
      if (i > 0 && tied) out[out.length - 1].push(pos);
      else out.push([pos]);
    });
    return out;
  }

  function refresh() {
    let rank = 0;
    cards().forEach((li, i) => {
      if (i === 0) li.dataset.tied = "0"; // the best reply cannot tie with nothing
      if (li.dataset.tied !== "1") rank += 1;
      li.querySelector(".rank-no").textContent = "#" + rank;
      li.classList.toggle("tied", li.dataset.tied === "1");
      li.setAttribute("aria-label", `rank ${rank}: ${li.querySelector(".letter").textContent}`);
    });
    renderStrengths();
  }

  function renderStrengths() {
    const box = document.getElementById("strengths");
    if (!askStrength) return;
    const g = groups(readDom());
    const letter = (pos) => list.querySelector(`li[data-position="${pos}"] .letter`).textContent.replace("Reply ", "");
    const saved = strengths[active] || [];
    box.hidden = g.length < 2;
    box.replaceChildren();
    const title = document.createElement("p");
    title.textContent = "How much better is each rank than the next?";
    box.appendChild(title);
    for (let i = 0; i + 1 < g.length; i++) {
      const label = document.createElement("label");
      label.textContent = `#${i + 1} (${g[i].map(letter).join("=")}) vs #${i + 2} (${g[i + 1].map(letter).join("=")}) `;
      const sel = document.createElement("select");
      sel.className = "strength";
      sel.dataset.step = String(i);
      const blank = new Option("choose…", "");
      sel.add(blank);
      for (const s of strengthNames) sel.add(new Option(s === "better" ? "better" : s + " better", s));
      sel.value = saved[i] || "";
      sel.addEventListener("change", () => {
        strengths[active] = strengths[active] || [];
        strengths[active][i] = sel.value;
      });
      label.appendChild(sel);
      box.appendChild(label);
    }
  }

  function changed() {
    // The order changed, so the strengths between neighbouring ranks no longer apply.
    strengths[active] = [];
    refresh();
  }

  function move(li, delta) {
    const all = cards();
    const i = all.indexOf(li);
    const j = Math.max(0, Math.min(all.length - 1, i + delta));
    if (i === j) return;
    li.dataset.tied = "0";
    if (delta < 0) list.insertBefore(li, all[j]);
    else list.insertBefore(li, all[j].nextSibling);
    li.focus();
    changed();
  }

  function moveTo(li, rank) {
    const all = cards().filter((x) => x !== li);
    const j = Math.max(0, Math.min(all.length, rank - 1));
    li.dataset.tied = "0";
    list.insertBefore(li, all[j] || null);
    li.focus();
    changed();
  }

  function toggleTie(li) {
    if (cards().indexOf(li) === 0) return;
    li.dataset.tied = li.dataset.tied === "1" ? "0" : "1";
    changed();
  }

  function switchCriterion(name) {
    if (name === active) return;
    orders[active] = readDom();
    active = name;
    viewed.add(name);
    document.querySelectorAll(".criterion").forEach((b) => b.classList.toggle("active", b.dataset.criterion === name));
    applyOrder(orders[name] || initialOrder);
    setStatus(`Ranking by ${name}.`);
  }

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", !!isError);
  }

  // -- drag and drop ------------------------------------------------------------------------------
  let dragged = null;
  list.addEventListener("dragstart", (e) => {
    dragged = e.target.closest("li");
    if (!dragged) return;
    dragged.classList.add("dragging");
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", dragged.dataset.position);
  });
  list.addEventListener("dragover", (e) => {
    if (!dragged) return;
    e.preventDefault();
    const over = e.target.closest("li");
    if (!over || over === dragged) return;
    const box = over.getBoundingClientRect();
    const after = e.clientY > box.top + box.height / 2;
    list.insertBefore(dragged, after ? over.nextSibling : over);
  });
  list.addEventListener("drop", (e) => e.preventDefault());
  list.addEventListener("dragend", () => {
    if (!dragged) return;
    dragged.classList.remove("dragging");
    dragged.dataset.tied = "0";
    dragged = null;
    changed();
  });

  // -- buttons ------------------------------------------------------------------------------------
  list.addEventListener("click", (e) => {
    const li = e.target.closest("li");
    if (!li) return;
    if (e.target.classList.contains("up")) move(li, -1);
    else if (e.target.classList.contains("down")) move(li, 1);
    else if (e.target.classList.contains("tie-btn")) toggleTie(li);
  });
  document.querySelectorAll(".criterion").forEach((b) =>
    b.addEventListener("click", () => switchCriterion(b.dataset.criterion)));
  document.getElementById("submit").addEventListener("click", submit);
  document.getElementById("skip").addEventListener("click", skip);

  // -- keyboard -----------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); return; }
    const tag = (e.target.tagName || "").toLowerCase();
    if (tag === "textarea" || tag === "input" || tag === "select") return;
    if (e.key === "[" || e.key === "]") {
      const i = criteria.indexOf(active) + (e.key === "]" ? 1 : -1);
      if (i >= 0 && i < criteria.length) switchCriterion(criteria[i]);
      return;
    }
    const li = e.target.closest ? e.target.closest("#ranking li") : null;
    const all = cards();
    if (!li) {
      if (e.key === "ArrowDown" || e.key === "ArrowUp") { e.preventDefault(); all[0].focus(); }
      return;
    }
    const i = all.indexOf(li);
    if (e.key === "ArrowUp" || e.key === "ArrowDown") {
      e.preventDefault();
      const delta = e.key === "ArrowUp" ? -1 : 1;
      if (e.shiftKey || e.altKey) move(li, delta);
      else (all[i + delta] || li).focus();
    } else if (/^[1-9]$/.test(e.key)) {
      moveTo(li, Number(e.key));
    } else if (e.key === "t" || e.key === "T") {
      toggleTie(li);
    }
  });

  // -- submit / skip ------------------------------------------------------------------------------
  function payload() {
    orders[active] = readDom();
    const rankings = {};
    const str = {};
    for (const c of criteria) {
      const order = orders[c] || initialOrder;
      rankings[c] = groups(order);
      if (askStrength && rankings[c].length > 1) str[c] = (strengths[c] || []).slice(0, rankings[c].length - 1);
    }
    const flags = cards()
      .filter((li) => li.querySelector(".flag").value)
      .map((li) => ({ position: Number(li.dataset.position), reason: li.querySelector(".flag").value }));
    const body = { client_id: clientId, assignment_id: assignmentId, rankings, flags,
                   comment: document.getElementById("comment").value };
    if (askStrength) body.strengths = str;
    return body;
  }

  function check(body) {
    const unseen = criteria.filter((c) => !viewed.has(c));
    if (unseen.length) return `Rank by every criterion first: ${unseen.join(", ")} (use the tabs or [ ]).`;
    if (askStrength) {
      for (const c of criteria) {
        const need = body.rankings[c].length - 1;
        const got = (body.strengths[c] || []).filter(Boolean).length;
        if (got < need) return `Choose how much better each rank is (${c}).`;
      }
    }
    return null;
  }

  async function post(url, body) {
    // Retry network failures with the same body (same client_id): the server stores it once.
    for (let attempt = 0; ; attempt++) {
      try {
        return await fetch(url, {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (err) {
        if (attempt >= 4) throw err;
        setStatus("Connection problem, retrying…", true);
        await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
      }
    }
  }

  let busy = false;
  async function submit() {
    if (busy) return;
    const body = payload();
    const problem = check(body);
    if (problem) { setStatus(problem, true); return; }
    busy = true;
    setStatus("Saving…");
    try {
      const res = await post("/api/submissions", body);
      const data = await res.json().catch(() => ({}));
      if (res.ok) { setStatus("Saved ✓"); window.location.assign("/label"); return; }
      setStatus(data.error || `Could not save (HTTP ${res.status}).`, true);
    } catch (err) {
      setStatus("Could not reach the server; your ranking is still here, press Submit again.", true);
    }
    busy = false;
  }

  async function skip() {
    if (busy) return;
    busy = true;
    const res = await post(`/api/assignments/${assignmentId}/skip`);
    if (res.ok) { window.location.assign("/label"); return; }
    const data = await res.json().catch(() => ({}));
    setStatus(data.error || "Could not skip.", true);
    busy = false;
  }

  refresh();
})();
