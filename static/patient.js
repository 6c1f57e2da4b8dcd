// Patient pages: upload progress, copy link, print card, share-form hints.
// No inline handlers anywhere (the CSP forbids them): everything is wired here.
(function () {
  "use strict";

  function uploadWithProgress(form) {
    var bar = document.getElementById("upload-bar");
    var box = document.getElementById("upload-progress");
    var status = document.getElementById("upload-status");
    var error = document.getElementById("upload-error");
    var button = document.getElementById("upload-button");
    form.addEventListener("submit", function (event) {
      if (!window.FormData || !window.XMLHttpRequest) {
        return; // the plain form post still works
      }
      event.preventDefault();
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
      xhr.setRequestHeader("Accept", "application/json");
      box.hidden = false;
      error.hidden = true;
      button.disabled = true;
      bar.value = 0;
      status.textContent = "Uploading…";
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) {
          bar.value = Math.round((e.loaded / e.total) * 100);
          status.textContent = "Uploading… " + bar.value + "%";
        }
      });
      xhr.upload.addEventListener("load", function () {
        bar.value = 100;
        status.textContent = "Uploaded. Importing…";
      });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status >= 200 && xhr.status < 300 && body && body.redirect) {
          window.location.assign(body.redirect);
          return;
        }
        button.disabled = false;
        box.hidden = true;
        error.textContent = (body && body.message) ? body.message : "The upload failed (" + xhr.status + "). Try again.";
        error.hidden = false;
      });
      xhr.addEventListener("error", function () {
        button.disabled = false;
        box.hidden = true;
        error.textContent = "The upload did not reach the server. Check your connection and try again.";
        error.hidden = false;
      });
      xhr.send(new FormData(form));
    });
  }

  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var input = document.querySelector(button.getAttribute("data-copy"));
        var status = document.getElementById("copy-status");
        var done = function () { if (status) { status.textContent = "Copied."; } button.textContent = "Copied"; };
        input.focus();
        input.select();
        var copied = false;
        try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
        if (copied) {
          done();
        } else if (navigator.clipboard) {
          navigator.clipboard.writeText(input.value).then(done, function () {
            if (status) { status.textContent = "Select the link and copy it by hand."; }
          });
        } else if (status) {
          status.textContent = "Select the link and copy it by hand.";
        }
      });
    });
  }

  function printButtons() {
    document.querySelectorAll("[data-print]").forEach(function (button) {
      button.addEventListener("click", function () { window.print(); });
    });
  }

  function shareForm(form) {
    // Touching a date or a type chooses the matching "what to share" option.
    form.querySelectorAll("[data-scope]").forEach(function (box) {
      var radio = document.getElementById("scope-" + box.getAttribute("data-scope"));
      box.addEventListener("change", function () { radio.checked = true; });
    });
    var n = document.getElementById("max_uses");
    if (n) {
      n.addEventListener("input", function () { document.getElementById("uses-n").checked = true; });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var upload = document.getElementById("upload-form");
    if (upload) { uploadWithProgress(upload); }
    var share = document.getElementById("share-form");
    if (share) { shareForm(share); }
    copyButtons();
    printButtons();
  });
})();
