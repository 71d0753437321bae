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
