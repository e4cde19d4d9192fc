// The vote page: keyboard shortcuts, the latency from "both images shown" to the click, and
// swapping in the server's answer when a vote is refused (409/422/429 carry the next state).
(function () {
  "use strict";

  const KEYS = {
    ArrowLeft: "ArrowLeft",
    ArrowRight: "ArrowRight",
    ArrowDown: "ArrowDown",
    b: "b", B: "b",
    s: "s", S: "s",
    u: "u", U: "u",
  };
  const SWAP_ON = [409, 422, 429];
  let shownAt = null;
  let undoTimer = null;

  function area() {
    return document.getElementById("vote-area");
  }

  // Latency counts from the moment both images are on screen, not from the request.
  function armLatency(root) {
    shownAt = null;
    const imgs = Array.from(root.querySelectorAll(".pair img"));
    if (imgs.length === 0) return;
    let pending = imgs.filter((img) => !img.complete).length;
    const shown = () => {
      shownAt = performance.now();
      root.dataset.ready = "true";
    };
    if (pending === 0) {
      shown();
      return;
    }
    imgs.forEach((img) => {
      if (img.complete) return;
      const one = () => {
        pending -= 1;
        if (pending === 0) shown();
      };
      img.addEventListener("load", one, { once: true });
      img.addEventListener("error", one, { once: true });
    });
  }

  // The undo control disappears when the server would refuse the change anyway.
  function armUndo(root) {
    if (undoTimer) clearTimeout(undoTimer);
    const undo = root.querySelector(".undo[data-expires-in]");
    if (!undo) return;
    const seconds = parseInt(undo.dataset.expiresIn, 10);
    if (!(seconds > 0)) return;
    undoTimer = setTimeout(() => undo.remove(), seconds * 1000);
  }

  function arm() {
    const root = area();
    if (!root) return;
    armLatency(root);
    armUndo(root);
  }

  document.addEventListener("htmx:configRequest", (event) => {
    const elt = event.detail.elt;
    if (!(elt instanceof Element) || !elt.matches("form.vote-form")) return;
    if (event.detail.parameters.latency_ms === undefined) return;
    event.detail.parameters.latency_ms =
      shownAt === null ? "" : String(Math.round(performance.now() - shownAt));
  });

  document.addEventListener("htmx:beforeSwap", (event) => {
    if (SWAP_ON.includes(event.detail.xhr.status)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });

  document.addEventListener("htmx:afterSwap", () => {
    if (!area()) return;
    arm();
    // Keep keyboard users in place: the new prompt is the next thing to read.
    const prompt = document.querySelector("#vote-area .prompt");
    if (prompt) prompt.focus({ preventScroll: true });
  });

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.repeat) return;
    const target = event.target;
    if (target instanceof HTMLElement &&
        (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) {
      return;
    }
    const key = KEYS[event.key];
    const root = area();
    if (!key || !root) return;
    const button = root.querySelector(`[data-key="${key}"]`);
    if (!button || button.disabled) return;
    event.preventDefault();
    // A key pressed right after a swap can beat htmx's settle step: make sure the button's
    // hx-* attributes are live before clicking it (process is idempotent).
    if (window.htmx) window.htmx.process(button);
    button.click();
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", arm);
  } else {
    arm();
  }
})();
