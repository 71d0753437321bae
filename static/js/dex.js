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
})();
