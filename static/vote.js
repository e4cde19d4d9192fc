// The vote page: keyboard shortcuts and swipes, the latency from "both images shown" to the click, and
// swapping in the server's answer when a vote is refused (409/422/429 carry the next state).
// The choice buttons stay inert until both images are on screen and the project's minimum
// viewing time (data-min-view-ms) has passed, and while a vote is in flight: a key pressed
// during the swap does nothing, and no click can fall through to a native form POST.
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
  let readyTimer = null;
  let inFlight = false;

  function area() {
    return document.getElementById("vote-area");
  }

  function choiceButtons(root) {
    return Array.from(root.querySelectorAll(".choices button"));
  }

  function setReady(root, ready) {
    root.dataset.ready = ready ? "true" : "false";
    choiceButtons(root).forEach((button) => {
      button.disabled = !ready;
    });
  }

  function isReady() {
    const root = area();
    return !!root && root.dataset.ready === "true" && !inFlight;
  }

  // Latency counts from the moment both images are on screen, not from the request.
  function armLatency(root) {
    shownAt = null;
    if (readyTimer) clearTimeout(readyTimer);
    const imgs = Array.from(root.querySelectorAll(".pair img"));
    if (imgs.length === 0) return;
    setReady(root, false);
    const minView = Math.max(0, parseInt(root.dataset.minViewMs || "0", 10) || 0);
    let pending = imgs.filter((img) => !img.complete).length;
    const shown = () => {
      shownAt = performance.now();
      imgs.forEach((img) => {
        img.classList.toggle(
          "pixelated", img.naturalWidth > 0 && img.naturalWidth * 2 <= img.clientWidth
        );
      });
      // A small margin: the server compares the rounded latency with the same minimum.
      const wait = minView > 0 ? minView + 25 : 0;
      readyTimer = setTimeout(() => {
        if (area() === root) setReady(root, true);
      }, wait);
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

  // Runs before htmx's own submit handler (capture on the document): a submit while the pair
  // is not ready is dropped, and one on a form htmx has not wired up yet is re-sent through it.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.matches("form.vote-form")) return;
    const root = area();
    if ((root && root.dataset.ready === "false") || inFlight) {
      event.preventDefault();
      event.stopImmediatePropagation();
      return;
    }
    if (window.htmx && !(form["htmx-internal-data"] || {}).initHash) {
      event.preventDefault();
      event.stopImmediatePropagation();
      if (form.dataset.resent) return;  // htmx would not take it: never loop
      form.dataset.resent = "1";
      window.htmx.process(form);
      form.requestSubmit(event.submitter || undefined);
    }
  }, true);

  document.addEventListener("htmx:beforeRequest", (event) => {
    const elt = event.detail.elt;
    if (elt instanceof Element && elt.closest("form.vote-form")) inFlight = true;
  });

  document.addEventListener("htmx:afterRequest", () => {
    inFlight = false;
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
    // Keep keyboard users in place: the new prompt is the next thing to read. The focus ring
    // is for Tab users only (:focus-visible), so it does not linger after a vote.
    const prompt = document.querySelector("#vote-area .prompt");
    if (prompt) prompt.focus({ preventScroll: true, focusVisible: false });
  });

  // A click or tap on an image opens it full size; Escape (or a click) closes it.
  function fullsize() {
    let dialog = document.getElementById("fullsize");
    if (!dialog) {
      dialog = document.createElement("dialog");
      dialog.id = "fullsize";
      dialog.className = "fullsize";
      dialog.setAttribute("aria-label", "Image at full size");
      dialog.appendChild(document.createElement("img"));
      dialog.addEventListener("click", () => dialog.close());
      document.body.appendChild(dialog);
    }
    return dialog;
  }

  document.addEventListener("click", (event) => {
    const img = event.target;
    if (!(img instanceof HTMLImageElement) || !img.closest("#vote-area .pair")) return;
    const dialog = fullsize();
    const big = dialog.querySelector("img");
    big.src = img.src;
    big.alt = img.alt;
    big.classList.toggle("pixelated", img.classList.contains("pixelated"));
    dialog.showModal();
  });

  // The button a shortcut or a swipe stands for, if it may vote now: during a swap or before
  // the minimum viewing time the gesture is swallowed, not queued.
  function pressable(key) {
    const root = area();
    if (!root) return null;
    const button = root.querySelector(`[data-key="${key}"]`);
    if (!button) return null;
    if (button.disabled || (button.closest(".choices") && !isReady())) return false;
    return button;
  }

  function press(button) {
    // A key pressed right after a swap can beat htmx's settle step: make sure the button's
    // hx-* attributes are live before clicking it (process is idempotent).
    if (window.htmx) window.htmx.process(button);
    button.click();
  }

  // Touch screens: a horizontal swipe across the images votes for the side it goes to (left
  // for Left, right for Right). Short, slow-to-decide or mostly vertical moves are scrolling
  // or a tap (which opens the image full size), not a vote.
  const SWIPE_MIN_PX = 60;
  let swipe = null;
  document.addEventListener("touchstart", (event) => {
    swipe = null;
    if (event.touches.length !== 1 || !(event.target instanceof Element)) return;
    if (!event.target.closest("#vote-area .pair")) return;
    const t = event.touches[0];
    swipe = { x: t.clientX, y: t.clientY, at: performance.now() };
  }, { passive: true });

  document.addEventListener("touchcancel", () => { swipe = null; }, { passive: true });

  document.addEventListener("touchend", (event) => {
    const start = swipe;
    swipe = null;
    if (!start || event.changedTouches.length !== 1) return;
    if (document.querySelector("dialog.fullsize[open]")) return;
    const t = event.changedTouches[0];
    const dx = t.clientX - start.x;
    const dy = t.clientY - start.y;
    const wide = Math.max(SWIPE_MIN_PX, 0.15 * window.innerWidth);
    if (Math.abs(dx) < wide || Math.abs(dy) > 0.6 * Math.abs(dx)) return;
    if (performance.now() - start.at > 1000) return;
    const button = pressable(dx < 0 ? "ArrowLeft" : "ArrowRight");
    if (!button) return;
    press(button);
  });

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.repeat) return;
    // While an image is shown full size, keys belong to the dialog (Escape closes it).
    if (document.querySelector("dialog.fullsize[open]")) return;
    const target = event.target;
    if (target instanceof HTMLElement &&
        (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) {
      return;
    }
    const key = KEYS[event.key];
    if (!key) return;
    const button = pressable(key);
    if (button === null) return;
    event.preventDefault();
    if (button) press(button);
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", arm);
  } else {
    arm();
  }
})();
