// The little the htmx ws extension doesn't do: show the connection's state, reconnect after a server going
// away (a daphne restart closes with 1001, which htmx doesn't retry), keep the log pane at its end.
(function () {
  "use strict";

  function indicate(state, text) {
    var el = document.getElementById("connection");
    if (el) {
      el.dataset.state = state;
      el.textContent = text;
    }
  }

  document.addEventListener("htmx:wsConnecting", function () { indicate("connecting", "connecting…"); });
  document.addEventListener("htmx:wsOpen", function () { indicate("live", "live"); });
  document.addEventListener("htmx:wsError", function () { indicate("offline", "offline"); });
  document.addEventListener("htmx:wsClose", function (evt) {
    indicate("offline", "offline — reconnecting");
    var code = evt.detail.event && evt.detail.event.code;
    if ((code === 1001 || code === 1005) && document.body.contains(evt.target)) {
      setTimeout(function () { evt.detail.socketWrapper.reconnect(); }, 500 + Math.random() * 1500);
    }
  });

  // Forms that ask before acting (revoke a key, delete a schedule): `data-confirm="question"`. Not an inline
  // onsubmit handler, which the Content-Security-Policy (script-src 'self') would block.
  document.addEventListener("submit", function (evt) {
    var form = evt.target;
    var question = form && form.dataset && form.dataset.confirm;
    if (question && !window.confirm(question)) {
      evt.preventDefault();
      evt.stopImmediatePropagation();
    }
  }, true);

  // A run page region carries `data-version` ("<xmax>-<in progress>" of the Postgres snapshot it was read
  // under, runs/fragments.py): an action's response can arrive after the websocket pushed a newer header, and
  // must not put the older one back.
  function parseVersion(text) {
    var match = /^(\d+)-(\d+)$/.exec(text || "");
    return match ? { xmax: BigInt(match[1]), inProgress: Number(match[2]) } : null;
  }
  function olderThan(incoming, current) {
    var a = parseVersion(incoming), b = parseVersion(current);
    if (!a || !b) { return false; }
    return a.xmax < b.xmax || (a.xmax === b.xmax && a.inProgress > b.inProgress);
  }
  window.dexOlderVersion = olderThan;
  document.addEventListener("htmx:oobBeforeSwap", function (evt) {
    var incoming = evt.detail.fragment, target = evt.detail.target;
    // For an outerHTML swap (hx-swap-oob="true") htmx hands over a DocumentFragment holding the region.
    if (incoming && !incoming.getAttribute) { incoming = incoming.firstElementChild; }
    if (incoming && incoming.getAttribute && target && target.getAttribute &&
        olderThan(incoming.getAttribute("data-version"), target.getAttribute("data-version"))) {
      evt.detail.shouldSwap = false;
    }
  });

  // An action's response (a notice and the regions, all out of band) must land even when the form that sent it
  // was replaced meanwhile by a pushed header: htmx looks for the regions under the form's own root, which for
  // a detached form is the old header, and would drop the whole response. Swap it against the document instead.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var target = evt.detail.target;
    if (!target || !target.addEventListener) { return; }
    target.addEventListener("htmx:beforeSwap", function (swapEvt) {
      if (!swapEvt.detail.shouldSwap || document.body.contains(target)) { return; }
      swapEvt.detail.shouldSwap = false;
      window.htmx.swap(document.body, swapEvt.detail.serverResponse, { swapStyle: "none" });
    }, { once: true });
  });

  var pinned = [];
  document.addEventListener("htmx:wsBeforeMessage", function () {
    pinned = Array.prototype.filter.call(document.querySelectorAll(".autoscroll"), function (el) {
      var box = el.parentElement;
      return box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    }).map(function (el) { return el.id; });
  });
  document.addEventListener("htmx:wsAfterMessage", function () {
    pinned.forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { el.parentElement.scrollTop = el.parentElement.scrollHeight; }
    });
  });

  // The trace (runs/web/fragments.py Timeline): every [data-start] of a timeline is laid out again against one
  // axis — the run's start to its end, or to now while it goes on — so a row pushed later lines up with the
  // rows already shown, open segments (running, waiting, backing off) grow, and the tick labels follow.
  function elapsed(ms) {
    var s = ms / 1000;
    if (s < 1) { return Math.round(ms) + " ms"; }
    if (s < 60) { return s.toFixed(1) + " s"; }
    var m = Math.floor(s / 60), h = Math.floor(m / 60);
    if (m < 60) { return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s"; }
    return h + "h " + String(m % 60).padStart(2, "0") + "m";
  }
  function runLive() {
    var header = document.querySelector("[data-run-header]");
    var status = header && header.dataset.status;
    return !!status && ["completed", "failed", "canceled", "timed_out"].indexOf(status) < 0;
  }
  function layoutTimeline(tl, live, now, axis) {
    var own = Array.prototype.filter.call(tl.querySelectorAll("[data-start]"), function (el) {
      return el.closest(".timeline") === tl && el.dataset.start;
    });
    var start = Number(tl.dataset.axisStart) || 0, end = Number(tl.dataset.axisEnd) || 0;
    own.forEach(function (el) {
      var s = Number(el.dataset.start), e = el.dataset.end ? Number(el.dataset.end) : now;
      if (!start || s < start) { start = s; }
      if (e > end) { end = e; }
    });
    if (axis) { start = Math.min(start || axis.start, axis.start); end = Math.max(end, axis.end); }
    if (!start) { return false; }
    if (live) { end = Math.max(end, now); }
    var span = Math.max(end - start, 1);
    tl.dexAxis = { start: start, end: end };
    own.forEach(function (el) {
      var s = Number(el.dataset.start), e = el.dataset.end ? Number(el.dataset.end) : now;
      var left = Math.min(Math.max((s - start) / span, 0), 1);
      var width = Math.max(Math.min((e - s) / span, 1 - left), 0.004);
      el.style.left = (left * 100).toFixed(2) + "%";
      el.style.width = (width * 100).toFixed(2) + "%";
    });
    var ticks = tl.querySelectorAll(":scope > .axis .tick");
    Array.prototype.forEach.call(ticks, function (tick, i) {
      tick.textContent = elapsed(span * i / Math.max(ticks.length - 1, 1));
    });
    return live || own.some(function (el) { return !el.dataset.end; });
  }
  function layout() {
    var now = Date.now(), live = runLive(), again = false;
    // A nested child run's steps go on its parent's axis: one time axis for the whole trace.
    var main = document.querySelector("[data-timeline]");
    if (main) { again = layoutTimeline(main, live, now, null) || again; }
    Array.prototype.forEach.call(document.querySelectorAll(".child-timeline"), function (tl) {
      again = layoutTimeline(tl, false, now, main && main.dexAxis) || again;
    });
    // The header's duration ticks while the run goes on; its steps-done count follows the pushed rows.
    Array.prototype.forEach.call(document.querySelectorAll("[data-run-duration][data-started-at]"), function (el) {
      if (el.dataset.finishedAt || !live) { return; }
      el.textContent = elapsed(now - Number(el.dataset.startedAt));
      again = true;
    });
    var done = document.querySelector("[data-run-steps-completed]");
    var timeline = document.querySelector("[data-timeline]");
    if (done && timeline) {
      var rows = timeline.querySelectorAll(":scope > .step-completed").length;
      if (!done.dataset.rowsSeen) { done.dataset.rowsSeen = String(rows); }
      done.textContent = String(Number(done.dataset.base || 0) + rows - Number(done.dataset.rowsSeen));
    }
    return again;
  }
  var ticking = null;
  function relayout() {
    if (layout() && !ticking) {
      ticking = setInterval(function () {
        if (!layout()) { clearInterval(ticking); ticking = null; }
      }, 1000);
    }
  }
  document.addEventListener("DOMContentLoaded", relayout);
  document.addEventListener("htmx:wsAfterMessage", relayout);
  document.addEventListener("htmx:afterSettle", relayout);

  // The row of the step shown in the inspector is marked, also after the inspector changed by a click.
  function markInspected() {
    var inspector = document.querySelector("[data-step-inspector]");
    var key = inspector && inspector.dataset.inspectedKey;
    Array.prototype.forEach.call(document.querySelectorAll("[data-timeline] > .step"), function (row) {
      row.classList.toggle("inspected", !!key && row.dataset.stepKey === key);
    });
  }
  document.addEventListener("DOMContentLoaded", markInspected);
  document.addEventListener("htmx:afterSettle", markInspected);

  // Errors of htmx requests: the dashboard's own (runs/web/errors.py) come as a 200 notice retargeted to
  // #dex-error; any other failed request (a proxy's error page, a timeout) is said there too, never swapped in.
  function showError(html) {
    var slot = document.getElementById("dex-error");
    if (slot) { slot.innerHTML = html; }
  }
  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr, p = document.createElement("p");
    p.className = "notice notice-error";
    p.textContent = "The request failed (" + (xhr ? xhr.status + " " + (xhr.statusText || "") : "error") + ").";
    showError(p.outerHTML);
  });
  // A later request that succeeds clears the notice of an earlier failure.
  document.addEventListener("htmx:beforeRequest", function () { showError(""); });
  document.addEventListener("htmx:sendError", function () {
    showError('<p class="notice notice-error">The server can\'t be reached: check the connection and try again.</p>');
  });
})();
