/* The receive page: a scanned SMART Health Link fills the link field. The person then adds
 * the passcode, if any, and saves (scanning never submits on its own). */
(function () {
  "use strict";
  function init() {
    var box = document.getElementById("receive-scan");
    if (!box || !window.ShlScanner) return;
    window.ShlScanner({
      button: "scan-button", stop: "scan-stop", status: "scan-status", video: "scan-video",
      jsqr: box.getAttribute("data-jsqr"),
      onLink: function (text) {
        var field = document.getElementById("link");
        field.value = text;
        document.getElementById("passcode").focus();
      },
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
