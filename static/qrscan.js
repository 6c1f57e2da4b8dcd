/* QR scanning with the device camera, shared by the viewer and the receive page.
 *
 * ShlScanner({button, stop, status, video, jsqr, onLink}) wires a "scan" button: it starts
 * the camera, decodes frames with the vendored jsQR (loaded on first use from the URL in
 * `jsqr`), and calls onLink(text) with the first QR code that holds a SMART Health Link.
 * Elements are passed by id. No network requests besides loading jsQR from this site.
 */
(function () {
  "use strict";

  var PREFIX = "shlink:/";

  function ShlScanner(opts) {
    var $ = function (id) { return document.getElementById(id); };
    var state = { stream: null, timer: null };

    function loadJsQR() {
      if (typeof window.jsQR === "function") return Promise.resolve(window.jsQR);
      return new Promise(function (resolve, reject) {
        var script = document.createElement("script");
        script.src = opts.jsqr;
        script.onload = function () { resolve(window.jsQR); };
        script.onerror = function () { reject(new Error("the QR decoder did not load")); };
        document.head.appendChild(script);
      });
    }

    function stop() {
      if (state.timer) clearInterval(state.timer);
      state.timer = null;
      if (state.stream) state.stream.getTracks().forEach(function (t) { t.stop(); });
      state.stream = null;
      var video = $(opts.video);
      video.srcObject = null;
      video.hidden = true;
      $(opts.stop).hidden = true;
      $(opts.button).hidden = false;
    }

    async function start() {
      var status = $(opts.status);
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        status.textContent = "This browser cannot use a camera on this page (cameras need HTTPS). Paste the link instead.";
        return;
      }
      status.textContent = "Starting the camera…";
      var decode;
      try {
        decode = await loadJsQR();
        state.stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
      } catch (err) {
        stop();
        status.textContent = err && err.name === "NotAllowedError"
          ? "The camera was not allowed. Allow it in the browser's site settings, or paste the link instead."
          : "No camera could be started (" + String(err && (err.name || err.message)) + "). Paste the link instead.";
        return;
      }
      var video = $(opts.video);
      video.srcObject = state.stream;
      video.hidden = false;
      $(opts.button).hidden = true;
      $(opts.stop).hidden = false;
      try { await video.play(); } catch (e) { /* autoplay rules: frames still arrive */ }
      status.textContent = "Point the camera at the QR code.";
      var canvas = document.createElement("canvas");
      var ctx = canvas.getContext("2d", { willReadFrequently: true });
      state.timer = setInterval(function () {
        if (video.readyState < 2 || !video.videoWidth) return;
        var scale = Math.min(1, 800 / Math.max(video.videoWidth, video.videoHeight));
        canvas.width = Math.round(video.videoWidth * scale);
        canvas.height = Math.round(video.videoHeight * scale);
        ctx.drawImage(video, 0, 0, canvas.width, canvas.height);
        var frame = ctx.getImageData(0, 0, canvas.width, canvas.height);
        var code = decode(frame.data, frame.width, frame.height, { inversionAttempts: "attemptBoth" });
        if (!code || !code.data) return;
        if (code.data.indexOf(PREFIX) < 0) {
          status.textContent = "That QR code is not a SMART Health Link. Keep looking.";
          return;
        }
        stop();
        status.textContent = "Link found.";
        opts.onLink(code.data);
      }, 200);
    }

    $(opts.button).addEventListener("click", function () { start(); });
    $(opts.stop).addEventListener("click", function () {
      stop();
      $(opts.status).textContent = "";
    });
    return { start: start, stop: stop };
  }

  window.ShlScanner = ShlScanner;
})();
