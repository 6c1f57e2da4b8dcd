/*
 * shlhost's SMART Health Links viewer: /view#shlink:/...
 *
 * Everything happens in this browser: the link payload is read from the URL fragment (which
 * browsers never send to a server), the manifest and files are fetched from whichever server
 * hosts the link, and every file is decrypted here with WebCrypto (AES-256-GCM, "dir").
 *
 * Safety rules for this file: content from links and records is untrusted. It is put on the
 * page only through textContent and setAttribute on attributes that cannot run code; never
 * through innerHTML. FHIR narratives (text.div) are not rendered at all. Blob URLs that a
 * person can open get types that cannot run script (images, PDF, JSON, octet-stream).
 */
(function () {
  "use strict";

  var PREFIX = "shlink:/";
  var RECIPIENT_KEY = "shlhost.viewer.recipient";
  var DEFAULT_RECIPIENT = "Clinician";
  var EMBEDDED_LENGTH_MAX = 262144; // larger files come as short-lived location URLs
  var INFLATE_MAX = 64 * 1024 * 1024; // refuse DEFLATE bombs
  var SAFE_IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/avif"];

  var state = { link: null, keyBytes: null, passcode: null, lastRemaining: null, busy: false };
  var blobUrls = [];
  var generation = 0; // bumped on every new link: late answers for an old link are dropped

  // ------------------------------------------------------------------ small helpers

  function $(id) {
    return document.getElementById(id);
  }

  /** Build an element. text becomes textContent; attrs are set with setAttribute. */
  function el(tag, className, text, attrs) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null && text !== "") node.textContent = String(text);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        if (/^on/i.test(name)) throw new Error("refusing an event-handler attribute");
        node.setAttribute(name, attrs[name]);
      });
    }
    return node;
  }

  function ViewerError(kind, title, text) {
    this.kind = kind;
    this.title = title;
    this.text = text || "";
    this.message = title + (text ? ": " + text : "");
  }
  ViewerError.prototype = Object.create(Error.prototype);

  function isObj(v) {
    return v !== null && typeof v === "object" && !Array.isArray(v);
  }

  function arr(v) {
    return Array.isArray(v) ? v : v === undefined || v === null ? [] : [v];
  }

  function str(v) {
    return typeof v === "string" ? v : typeof v === "number" || typeof v === "boolean" ? String(v) : "";
  }

  function b64urlToBytes(text) {
    if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text)) throw new Error("not base64url");
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    return b64ToBytes(b64);
  }

  function b64ToBytes(b64) {
    var bin = atob(b64);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function utf8(bytes) {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  function hostOf(url) {
    try {
      return new URL(url).host;
    } catch (e) {
      return url;
    }
  }

  function formatEpoch(seconds) {
    var d = new Date(seconds * 1000);
    if (isNaN(d.getTime())) return String(seconds);
    return d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  /** FHIR date, dateTime or instant, shown as YYYY-MM-DD or YYYY-MM-DD HH:MM. */
  function fmtDate(value) {
    var s = str(value);
    var m = /^(\d{4}(?:-\d{2}(?:-\d{2})?)?)(?:T(\d{2}:\d{2}))?/.exec(s);
    if (!m) return s;
    return m[2] ? m[1] + " " + m[2] : m[1];
  }

  function storage() {
    try {
      return window.localStorage;
    } catch (e) {
      return null; // disabled storage (privacy settings): the field just starts empty
    }
  }

  // ------------------------------------------------------------------ the link payload

  /** Parse a bare or viewer-prefixed link. Unknown properties and flags are ignored. */
  function parseLink(raw) {
    var text = str(raw).trim();
    if (text.indexOf("%") >= 0) {
      try {
        text = decodeURIComponent(text);
      } catch (e) {
        /* keep it as it is */
      }
    }
    var at = text.indexOf(PREFIX);
    if (at < 0 || (at > 0 && text.charAt(at - 1) !== "#")) {
      throw new ViewerError("not-a-link", "This is not a SMART Health Link",
        "A link starts with shlink:/ (or carries it after a # in a web address).");
    }
    var body = text.slice(at + PREFIX.length).replace(/\s+/g, "");
    var data;
    try {
      data = JSON.parse(utf8(b64urlToBytes(body)));
    } catch (e) {
      throw new ViewerError("not-a-link", "This is not a SMART Health Link",
        "The part after shlink:/ is damaged (it is not base64url-encoded JSON). Was the link cut short?");
    }
    if (!isObj(data)) {
      throw new ViewerError("not-a-link", "This is not a SMART Health Link", "The link payload is not a JSON object.");
    }
    var url = data.url;
    var parsed = null;
    try {
      parsed = new URL(url);
    } catch (e) {
      parsed = null;
    }
    if (typeof url !== "string" || !parsed || (parsed.protocol !== "https:" && parsed.protocol !== "http:")) {
      throw new ViewerError("not-a-link", "This link is incomplete", "It has no usable web address (url).");
    }
    var keyBytes = null;
    if (typeof data.key === "string" && /^[A-Za-z0-9_-]{43}$/.test(data.key)) {
      keyBytes = b64urlToBytes(data.key);
    }
    if (!keyBytes || keyBytes.length !== 32) {
      throw new ViewerError("not-a-link", "This link is incomplete", "Its key is missing or damaged (43 characters expected).");
    }
    var flag = typeof data.flag === "string" ? data.flag.replace(/[^LPU]/g, "") : "";
    return {
      url: url,
      keyBytes: keyBytes,
      flag: flag,
      label: typeof data.label === "string" ? data.label : "",
      exp: typeof data.exp === "number" && isFinite(data.exp) ? data.exp : null
    };
  }

  // ------------------------------------------------------------------ crypto

  async function inflateRaw(bytes) {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser cannot inflate DEFLATE data (no DecompressionStream)");
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    var reader = stream.getReader();
    var chunks = [];
    var total = 0;
    for (;;) {
      var step = await reader.read();
      if (step.done) break;
      total += step.value.length;
      if (total > INFLATE_MAX) {
        await reader.cancel();
        throw new Error("the compressed content inflates beyond " + INFLATE_MAX + " bytes");
      }
      chunks.push(step.value);
    }
    var out = new Uint8Array(total);
    var offset = 0;
    chunks.forEach(function (c) {
      out.set(c, offset);
      offset += c.length;
    });
    return out;
  }

  function decryptFailure(detail) {
    return new ViewerError("decrypt", "This file could not be decrypted",
      detail || "The key in the link does not fit this file: the link may be damaged or incomplete. Ask the patient for the link again.");
  }

  /** Decrypt a compact JWE (alg dir, enc A256GCM, optional zip DEF) with the link key. */
  async function decryptJwe(token, keyBytes) {
    var parts = str(token).trim().split(".");
    if (parts.length !== 5) throw decryptFailure("The server sent something that is not an encrypted file (compact JWE).");
    var header;
    try {
      header = JSON.parse(utf8(b64urlToBytes(parts[0])));
    } catch (e) {
      throw decryptFailure("The encrypted file's header is damaged.");
    }
    if (!isObj(header) || header.alg !== "dir" || header.enc !== "A256GCM") {
      throw decryptFailure("The file uses an encryption this viewer does not know (expected dir + A256GCM).");
    }
    var iv, ct, tag;
    try {
      iv = b64urlToBytes(parts[2]);
      ct = b64urlToBytes(parts[3]);
      tag = b64urlToBytes(parts[4]);
    } catch (e) {
      throw decryptFailure("The encrypted file is damaged.");
    }
    var sealed = new Uint8Array(ct.length + tag.length);
    sealed.set(ct, 0);
    sealed.set(tag, ct.length);
    var plain;
    try {
      var key = await crypto.subtle.importKey("raw", keyBytes, { name: "AES-GCM" }, false, ["decrypt"]);
      plain = new Uint8Array(await crypto.subtle.decrypt(
        { name: "AES-GCM", iv: iv, additionalData: new TextEncoder().encode(parts[0]), tagLength: 128 },
        key, sealed));
    } catch (e) {
      throw decryptFailure();
    }
    if (header.zip === "DEF") {
      try {
        plain = await inflateRaw(plain);
      } catch (e) {
        throw decryptFailure("The file decrypted but could not be decompressed (" + e.message + ").");
      }
    }
    return { header: header, plaintext: plain };
  }

  // ------------------------------------------------------------------ the network

  function networkError(url) {
    return new ViewerError("network", "Could not reach " + hostOf(url),
      "Check the internet connection and try again. If it keeps failing, the server may be down or may not let web viewers read links (CORS).");
  }

  function deadLink() {
    if (state.lastRemaining === 0) {
      return new ViewerError("locked", "This link is locked",
        "Too many wrong passcodes were entered, so the server no longer opens it, even with the right passcode. Ask the patient for a new link.");
    }
    var lock = state.link && state.link.flag.indexOf("P") >= 0 ? ", was locked after too many wrong passcodes" : "";
    return new ViewerError("dead", "This link is no longer available",
      "The server does not share this record any more: the link has expired, was paused or revoked by the patient" +
      lock + ", or has been used up. Ask the patient for a new link.");
  }

  async function httpError(resp) {
    if (resp.status === 404) return deadLink();
    if (resp.status === 429) {
      var wait = resp.headers.get("Retry-After");
      return new ViewerError("busy", "Too many requests",
        "The server asks to wait" + (wait ? " " + plural(parseInt(wait, 10) || 1, "second", "seconds") : " a moment") + " before trying again.");
    }
    if (resp.status === 400) {
      return new ViewerError("bad-request", "The server refused the request",
        "It says the request was not valid (HTTP 400). The link may be damaged.");
    }
    return new ViewerError("http", "The server could not answer", "It answered HTTP " + resp.status + ". Try again later.");
  }

  async function send(url, options) {
    try {
      return await fetch(url, Object.assign({ credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" }, options));
    } catch (e) {
      throw networkError(url);
    }
  }

  /** The list of files behind the link: [{contentType, jwe}] (U) or the manifest's entries. */
  async function fetchFiles(link, recipient, passcode) {
    if (link.flag.indexOf("U") >= 0) {
      var direct = new URL(link.url);
      direct.searchParams.set("recipient", recipient);
      var resp = await send(direct.toString(), { method: "GET" });
      if (!resp.ok) throw await httpError(resp);
      return { status: "finalized", files: [{ contentType: null, jwe: await resp.text() }] };
    }
    var body = { recipient: recipient, embeddedLengthMax: EMBEDDED_LENGTH_MAX };
    if (passcode !== null) body.passcode = passcode;
    var answer = await send(link.url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body)
    });
    if (answer.status === 401) {
      var remaining = null;
      try {
        var info = await answer.json();
        if (isObj(info) && typeof info.remainingAttempts === "number") remaining = info.remainingAttempts;
      } catch (e) {
        remaining = null;
      }
      throw wrongPasscode(remaining);
    }
    if (!answer.ok) throw await httpError(answer);
    var manifest;
    try {
      manifest = await answer.json();
    } catch (e) {
      throw new ViewerError("http", "The server sent a manifest this viewer cannot read", "It is not JSON.");
    }
    if (!isObj(manifest) || !Array.isArray(manifest.files)) {
      throw new ViewerError("http", "The server sent a manifest this viewer cannot read", "It lists no files.");
    }
    if (manifest.status === "no-longer-valid") throw deadLink();
    return {
      status: str(manifest.status),
      files: manifest.files.filter(isObj).map(function (f) {
        return { contentType: str(f.contentType) || null, jwe: str(f.embedded) || null,
                 location: str(f.location) || null, lastUpdated: str(f.lastUpdated) };
      })
    };
  }

  function wrongPasscode(remaining) {
    state.lastRemaining = remaining;
    var err = new ViewerError("passcode", "Wrong passcode",
      remaining === null ? "Try again." :
      remaining > 0 ? plural(remaining, "attempt", "attempts") + " left before the link locks." :
      "No attempts left: the link is now locked. Ask the patient for a new link.");
    err.remaining = remaining;
    return err;
  }

  async function loadFile(file, keyBytes) {
    var token = file.jwe;
    if (!token) {
      var loc = null;
      try {
        loc = new URL(file.location);
      } catch (e) {
        loc = null;
      }
      if (!loc || (loc.protocol !== "https:" && loc.protocol !== "http:")) {
        throw new ViewerError("http", "A file could not be fetched", "The manifest gives it no usable address.");
      }
      var resp = await send(loc.toString(), { method: "GET" });
      if (resp.status === 404 || resp.status === 403) {
        throw new ViewerError("dead", "A file is no longer available",
          "Its download address may have expired (they last a few minutes). Reload the page to try again.");
      }
      if (!resp.ok) throw await httpError(resp);
      token = await resp.text();
    }
    var result = await decryptJwe(token, keyBytes);
    var contentType = file.contentType || str(result.header.cty) || "application/octet-stream";
    var json;
    try {
      json = JSON.parse(utf8(result.plaintext));
    } catch (e) {
      throw new ViewerError("format", "A file could not be read", "It decrypted, but it is not JSON (" + contentType + ").");
    }
    return { contentType: contentType, json: json, lastUpdated: file.lastUpdated || "" };
  }

  // ------------------------------------------------------------------ SMART Health Cards

  async function decodeHealthCards(json) {
    var cards = [];
    var list = isObj(json) ? arr(json.verifiableCredential) : [];
    for (var i = 0; i < list.length; i++) {
      var parts = str(list[i]).split(".");
      if (parts.length !== 3) continue;
      try {
        var header = JSON.parse(utf8(b64urlToBytes(parts[0])));
        var payload = b64urlToBytes(parts[1]);
        if (isObj(header) && header.zip === "DEF") payload = await inflateRaw(payload);
        var claims = JSON.parse(utf8(payload));
        var subject = isObj(claims) && isObj(claims.vc) && isObj(claims.vc.credentialSubject) ? claims.vc.credentialSubject : {};
        cards.push({
          issuer: str(claims.iss),
          nbf: typeof claims.nbf === "number" ? claims.nbf : null,
          types: arr(isObj(claims.vc) ? claims.vc.type : []).map(str),
          bundle: isObj(subject.fhirBundle) ? subject.fhirBundle : null
        });
      } catch (e) {
        cards.push({ error: "This card could not be read (" + e.message + ")." });
      }
    }
    return cards;
  }

  // ------------------------------------------------------------------ FHIR helpers

  function collectResources(root) {
    var out = [];
    if (!isObj(root)) return out;
    if (root.resourceType === "Bundle") {
      arr(root.entry).forEach(function (entry) {
        if (isObj(entry) && isObj(entry.resource)) out.push({ fullUrl: str(entry.fullUrl), resource: entry.resource });
      });
    } else if (typeof root.resourceType === "string") {
      out.push({ fullUrl: "", resource: root });
    }
    return out;
  }

  function makeIndex(entries) {
    var byRef = {};
    entries.forEach(function (e) {
      var r = e.resource;
      if (e.fullUrl) byRef[e.fullUrl] = r;
      if (typeof r.resourceType === "string" && typeof r.id === "string") byRef[r.resourceType + "/" + r.id] = r;
    });
    return {
      resolve: function (ref, from) {
        if (!isObj(ref) || typeof ref.reference !== "string") return null;
        var target = ref.reference;
        if (target.charAt(0) === "#" && from) {
          var id = target.slice(1);
          return arr(from.contained).filter(function (c) { return isObj(c) && c.id === id; })[0] || null;
        }
        if (byRef[target]) return byRef[target];
        var m = /([A-Za-z]+\/[A-Za-z0-9\-.]{1,64})(?:\/_history\/.*)?$/.exec(target);
        return m && byRef[m[1]] ? byRef[m[1]] : null;
      }
    };
  }

  function codeText(cc) {
    if (!isObj(cc)) return "";
    if (typeof cc.text === "string" && cc.text) return cc.text;
    var codings = arr(cc.coding).filter(isObj);
    for (var i = 0; i < codings.length; i++) if (codings[i].display) return str(codings[i].display);
    for (var j = 0; j < codings.length; j++) {
      if (codings[j].code) return systemName(codings[j].system) + str(codings[j].code);
    }
    return "";
  }

  /** A short name for well-known code systems, shown before a code that has no display. */
  function systemName(system) {
    var s = str(system).toLowerCase();
    var known = [["/cvx", "CVX"], ["loinc", "LOINC"], ["snomed", "SNOMED CT"], ["rxnorm", "RxNorm"],
      ["icd-10", "ICD-10"], ["ndc", "NDC"], ["atc", "ATC"]];
    for (var i = 0; i < known.length; i++) if (s.indexOf(known[i][0]) >= 0) return known[i][1] + " ";
    return "";
  }

  function codesText(list) {
    return arr(list).map(codeText).filter(Boolean).join(", ");
  }

  function humanName(name) {
    if (!isObj(name)) return "";
    if (typeof name.text === "string" && name.text) return name.text;
    return [].concat(arr(name.prefix), arr(name.given), arr(name.family), arr(name.suffix)).map(str).filter(Boolean).join(" ");
  }

  function patientName(p) {
    var names = arr(p.name).filter(isObj);
    var best = names.filter(function (n) { return n.use === "official"; })[0] || names.filter(function (n) { return n.use !== "old"; })[0] || names[0];
    return humanName(best);
  }

  function quantity(q) {
    if (!isObj(q)) return "";
    var value = str(q.value);
    if (!value) return "";
    var unit = str(q.unit) || str(q.code);
    return (str(q.comparator)) + value + (unit ? " " + unit : "");
  }

  function rangeText(r) {
    if (!isObj(r)) return "";
    if (r.text) return str(r.text);
    var low = quantity(r.low), high = quantity(r.high);
    if (low && high) return low + " – " + high;
    if (low) return "≥ " + low;
    if (high) return "≤ " + high;
    return "";
  }

  function valueText(o) {
    if (!isObj(o)) return "";
    if (isObj(o.valueQuantity)) return quantity(o.valueQuantity);
    if (isObj(o.valueCodeableConcept)) return codeText(o.valueCodeableConcept);
    if (typeof o.valueString === "string") return o.valueString;
    if (typeof o.valueBoolean === "boolean") return o.valueBoolean ? "yes" : "no";
    if (typeof o.valueInteger === "number") return String(o.valueInteger);
    if (typeof o.valueDateTime === "string") return fmtDate(o.valueDateTime);
    if (typeof o.valueTime === "string") return o.valueTime;
    if (isObj(o.valueRange)) return rangeText(o.valueRange);
    if (isObj(o.valueRatio)) return quantity(o.valueRatio.numerator) + " / " + quantity(o.valueRatio.denominator);
    if (isObj(o.valuePeriod)) return fmtDate(o.valuePeriod.start) + " – " + fmtDate(o.valuePeriod.end);
    if (isObj(o.dataAbsentReason)) return "(" + codeText(o.dataAbsentReason) + ")";
    return "";
  }

  function observationValue(o) {
    var main = valueText(o);
    var parts = arr(o.component).filter(isObj).map(function (c) {
      var v = valueText(c);
      return v ? codeText(c.code) + ": " + v : "";
    }).filter(Boolean);
    return [main].concat(parts).filter(Boolean).join("; ");
  }

  function effective(r) {
    if (!isObj(r)) return "";
    var p = r.effectivePeriod || r.performedPeriod || r.onsetPeriod || r.occurrencePeriod;
    return str(r.effectiveDateTime || r.effectiveInstant || r.occurrenceDateTime || r.performedDateTime ||
      r.onsetDateTime || r.issued || r.authoredOn || r.dateAsserted || r.recordedDate || r.date || (isObj(p) ? p.start : ""));
  }

  function medicationName(r, index) {
    if (isObj(r.medicationCodeableConcept)) return codeText(r.medicationCodeableConcept);
    var ref = r.medicationReference;
    if (isObj(r.medication)) { // FHIR R5: CodeableReference
      if (isObj(r.medication.concept)) return codeText(r.medication.concept);
      ref = r.medication.reference;
    }
    if (isObj(ref)) {
      var med = index.resolve(ref, r);
      if (isObj(med) && isObj(med.code)) return codeText(med.code);
      if (ref.display) return str(ref.display);
    }
    return "";
  }

  function dosageText(r) {
    var d = arr(r.dosage).concat(arr(r.dosageInstruction)).filter(isObj)[0];
    if (!d) return "";
    if (d.text) return str(d.text);
    var bits = [];
    var dr = arr(d.doseAndRate).filter(isObj)[0];
    if (dr && isObj(dr.doseQuantity)) bits.push(quantity(dr.doseQuantity));
    if (isObj(d.timing) && isObj(d.timing.code)) bits.push(codeText(d.timing.code));
    if (isObj(d.route)) bits.push(codeText(d.route));
    return bits.filter(Boolean).join(", ");
  }

  function statusOf(r) {
    return codeText(r.clinicalStatus) || str(r.status);
  }

  // ------------------------------------------------------------------ rendering

  function table(caption, columns, rows) {
    var section = el("section", "panel");
    var id = "sec-" + caption.toLowerCase().replace(/[^a-z]+/g, "-") + "-" + Math.random().toString(36).slice(2, 7);
    section.setAttribute("aria-labelledby", id);
    var h = el("h3", "panel-title", caption, { id: id });
    h.appendChild(el("span", "count", String(rows.length)));
    section.appendChild(h);
    var t = el("table", "data");
    var thead = el("thead");
    var tr = el("tr");
    columns.forEach(function (c) { tr.appendChild(el("th", null, c, { scope: "col" })); });
    thead.appendChild(tr);
    t.appendChild(thead);
    var tbody = el("tbody");
    rows.forEach(function (cells) {
      var row = el("tr");
      cells.forEach(function (cell, i) {
        var td = el("td", null, null, { "data-label": columns[i] });
        if (cell instanceof Node) td.appendChild(cell);
        else td.textContent = str(cell) || "—";
        if (!(cell instanceof Node) && !str(cell)) td.className = "empty";
        row.appendChild(td);
      });
      tbody.appendChild(row);
    });
    t.appendChild(tbody);
    section.appendChild(t);
    return section;
  }

  function byDateDesc(a, b) {
    var da = effective(a), db = effective(b);
    return da < db ? 1 : da > db ? -1 : 0;
  }

  function patientBanner(p) {
    var box = el("section", "patient", null, { "aria-label": "Patient" });
    box.appendChild(el("p", "patient-name", patientName(p) || "Unnamed patient"));
    var dl = el("dl", "patient-facts");
    function fact(term, value) {
      if (!value) return;
      var div = el("div");
      div.appendChild(el("dt", null, term));
      div.appendChild(el("dd", null, value));
      dl.appendChild(div);
    }
    fact("Born", fmtDate(p.birthDate));
    fact("Gender", str(p.gender));
    if (p.deceasedBoolean === true || p.deceasedDateTime) fact("Deceased", fmtDate(p.deceasedDateTime) || "yes");
    arr(p.identifier).filter(isObj).slice(0, 6).forEach(function (id) {
      var label = codeText(id.type) || (id.system ? str(id.system).replace(/^https?:\/\//, "") : "Identifier");
      fact(label, str(id.value));
    });
    var phone = arr(p.telecom).filter(function (t) { return isObj(t) && t.system === "phone"; })[0];
    if (phone) fact("Phone", str(phone.value));
    box.appendChild(dl);
    return box;
  }

  function safeImageType(ct) {
    return SAFE_IMAGE_TYPES.indexOf(ct) >= 0;
  }

  function blobUrl(bytes, type) {
    var url = URL.createObjectURL(new Blob([bytes], { type: type }));
    blobUrls.push(url);
    return url;
  }

  function sizeText(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return Math.round(n / 1024) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  /** An attachment (inline data only; remote urls are shown, never fetched or linked). */
  function attachmentNode(att, title) {
    var box = el("div", "attachment");
    if (!isObj(att)) return box;
    var ct = str(att.contentType).split(";")[0].trim().toLowerCase();
    var name = str(att.title) || title || "attachment";
    if (typeof att.data === "string" && att.data) {
      var bytes;
      try {
        bytes = b64ToBytes(att.data.replace(/\s+/g, ""));
      } catch (e) {
        box.appendChild(el("span", "muted", "Attached data is damaged (not base64)."));
        return box;
      }
      if (safeImageType(ct)) {
        var img = el("img", "attached-image", null, { alt: name, src: blobUrl(bytes, ct), loading: "lazy" });
        box.appendChild(img);
      } else if (ct === "application/pdf") {
        var isPdf = bytes.length > 4 && bytes[0] === 0x25 && bytes[1] === 0x50 && bytes[2] === 0x44 && bytes[3] === 0x46;
        var type = isPdf ? "application/pdf" : "application/octet-stream";
        box.appendChild(el("a", "button small", "Open PDF (" + sizeText(bytes.length) + ")",
          { href: blobUrl(bytes, type), target: "_blank", rel: "noopener noreferrer" }));
      } else if (ct.indexOf("text/plain") === 0) {
        var textBody = "";
        try { textBody = utf8(bytes); } catch (e) { textBody = "(not UTF-8 text)"; }
        box.appendChild(el("pre", "attached-text", textBody.length > 20000 ? textBody.slice(0, 20000) + "\n…" : textBody));
      } else {
        box.appendChild(el("a", "button small", "Download " + (ct || "file") + " (" + sizeText(bytes.length) + ")",
          { href: blobUrl(bytes, "application/octet-stream"), download: name.replace(/[^\w.\- ]+/g, "_").slice(0, 80) || "attachment" }));
      }
    } else if (att.url) {
      box.appendChild(el("span", "muted", "Stored elsewhere (not fetched): " + str(att.url)));
    } else {
      box.appendChild(el("span", "muted", "No content attached."));
    }
    return box;
  }

  function documentRows(resources) {
    var rows = [];
    resources.forEach(function (r) {
      if (r.resourceType === "DocumentReference") {
        var title = str(r.description) || codeText(r.type) || "Document";
        var content = el("div", "attachments");
        arr(r.content).filter(isObj).forEach(function (c) { content.appendChild(attachmentNode(c.attachment, title)); });
        rows.push([title, fmtDate(r.date || (isObj(r.context) && isObj(r.context.period) ? r.context.period.start : "")), content]);
      } else if (r.resourceType === "Media") {
        var mediaTitle = codeText(r.modality) || codeText(r.type) || codeText(r.view) || "Image";
        rows.push([mediaTitle, fmtDate(effective(r) || r.issued), attachmentNode(r.content, mediaTitle)]);
      } else if (r.resourceType === "Binary") {
        rows.push(["File (" + (str(r.contentType) || "unknown type") + ")", "", attachmentNode({ contentType: r.contentType, data: r.data }, "file")]);
      }
    });
    return rows;
  }

  var SHOWN = ["Patient", "AllergyIntolerance", "MedicationStatement", "MedicationRequest", "Medication", "Condition",
    "Immunization", "Observation", "DiagnosticReport", "DocumentReference", "Media", "Binary", "Bundle"];

  /** The readable record for one FHIR resource or Bundle. */
  function renderFhir(root) {
    var entries = collectResources(root);
    var index = makeIndex(entries);
    var all = entries.map(function (e) { return e.resource; });
    var of = function (type) { return all.filter(function (r) { return r.resourceType === type; }); };
    var out = document.createDocumentFragment();

    var patients = of("Patient");
    patients.forEach(function (p) { out.appendChild(patientBanner(p)); });
    if (!patients.length) out.appendChild(el("p", "muted", "No patient details in this file."));

    var allergies = of("AllergyIntolerance");
    if (allergies.length) {
      out.appendChild(table("Allergies", ["Substance", "Status", "Criticality", "Reaction", "Recorded"],
        allergies.map(function (a) {
          var reactions = arr(a.reaction).filter(isObj).map(function (x) {
            return codesText(x.manifestation) + (x.severity ? " (" + str(x.severity) + ")" : "");
          }).filter(Boolean).join("; ");
          return [codeText(a.code) || "Unnamed substance", statusOf(a), str(a.criticality), reactions,
            fmtDate(a.recordedDate || a.onsetDateTime)];
        })));
    }

    var meds = of("MedicationStatement").concat(of("MedicationRequest"));
    if (meds.length) {
      out.appendChild(table("Medications", ["Medication", "Status", "Dosage", "Since"],
        meds.map(function (m) {
          return [medicationName(m, index) || "Unnamed medication", str(m.status), dosageText(m), fmtDate(effective(m))];
        })));
    }

    var problems = of("Condition");
    if (problems.length) {
      out.appendChild(table("Problems", ["Problem", "Status", "Onset", "Recorded"],
        problems.map(function (c) {
          var onset = c.onsetDateTime || (isObj(c.onsetPeriod) ? c.onsetPeriod.start : "") || c.onsetString;
          return [codeText(c.code) || "Unnamed problem", statusOf(c), fmtDate(onset), fmtDate(c.recordedDate)];
        })));
    }

    var immunizations = of("Immunization").sort(byDateDesc);
    if (immunizations.length) {
      out.appendChild(table("Immunizations", ["Vaccine", "Date", "Status", "Lot", "Given by"],
        immunizations.map(function (i) {
          var by = arr(i.performer).filter(isObj).map(function (p) {
            var actor = index.resolve(p.actor, i);
            return (isObj(actor) && str(actor.name)) || (isObj(p.actor) ? str(p.actor.display) : "");
          }).filter(Boolean).join(", ");
          return [codeText(i.vaccineCode) || "Unnamed vaccine", fmtDate(i.occurrenceDateTime || i.occurrenceString),
            str(i.status), str(i.lotNumber), by];
        })));
    }

    var results = of("Observation").sort(byDateDesc);
    if (results.length) {
      out.appendChild(table("Results", ["Test", "Value", "Reference range", "Interpretation", "Date"],
        results.map(function (o) {
          return [codeText(o.code) || "Unnamed test", observationValue(o),
            arr(o.referenceRange).map(rangeText).filter(Boolean).join("; "), codesText(o.interpretation),
            fmtDate(effective(o))];
        })));
    }

    var reports = of("DiagnosticReport").sort(byDateDesc);
    if (reports.length) {
      out.appendChild(table("Reports", ["Report", "Status", "Date", "Conclusion"],
        reports.map(function (d) {
          return [codeText(d.code) || "Unnamed report", str(d.status), fmtDate(effective(d)),
            str(d.conclusion) || codesText(d.conclusionCode)];
        })));
    }

    var docs = documentRows(all);
    if (docs.length) out.appendChild(table("Documents and images", ["Title", "Date", "Content"], docs));

    var others = {};
    all.forEach(function (r) {
      var type = str(r.resourceType);
      if (type && SHOWN.indexOf(type) < 0) others[type] = (others[type] || 0) + 1;
    });
    var names = Object.keys(others).sort();
    if (names.length) {
      out.appendChild(el("p", "muted other-types", "Also in this file (not shown): " +
        names.map(function (n) { return n + " (" + others[n] + ")"; }).join(", ") + ". Download the FHIR JSON to see everything."));
    }
    return out;
  }

  function downloadButton(json, name) {
    var text = JSON.stringify(json, null, 2);
    return el("a", "button small", "Download FHIR JSON", {
      href: blobUrl(new TextEncoder().encode(text), "application/fhir+json"), download: name
    });
  }

  async function renderFile(file, n) {
    var section = el("section", "record-file");
    var head = el("div", "file-head");
    section.appendChild(head);
    if (file.error) {
      head.appendChild(el("h2", "file-title", "File " + n));
      var box = el("div", "notice notice-error");
      box.appendChild(el("p", "notice-title", file.error.title));
      box.appendChild(el("p", "notice-text", file.error.text));
      section.appendChild(box);
      return section;
    }
    if (file.contentType === "application/smart-health-card") {
      head.appendChild(el("h2", "file-title", "SMART Health Card (signature not verified in the browser)"));
      var cards = await decodeHealthCards(file.json);
      if (!cards.length) section.appendChild(el("p", "muted", "The file holds no health card."));
      cards.forEach(function (card, i) {
        var part = el("div", "card-part");
        if (card.error) {
          part.appendChild(el("p", "notice notice-error", card.error));
        } else {
          var meta = [];
          if (card.issuer) meta.push("Issued by " + card.issuer);
          if (card.nbf) meta.push("on " + formatEpoch(card.nbf).slice(0, 10));
          part.appendChild(el("p", "muted card-meta", meta.join(" ") + (meta.length ? ". " : "") +
            "The issuer's signature was not checked: treat the content as what the card claims."));
          if (card.bundle) {
            part.appendChild(downloadButton(card.bundle, "health-card-" + n + "-" + (i + 1) + ".json"));
            part.appendChild(renderFhir(card.bundle));
          }
        }
        section.appendChild(part);
      });
      return section;
    }
    if (file.contentType === "application/smart-api-access") {
      head.appendChild(el("h2", "file-title", "Access to a FHIR server"));
      section.appendChild(el("p", "muted", "This link also grants access to a FHIR server" +
        (isObj(file.json) && file.json.aud ? " (" + str(file.json.aud) + ")" : "") +
        ". This viewer does not follow such access grants."));
      return section;
    }
    var title = file.contentType === "application/fhir+json" ? "Health record" : "File (" + file.contentType + ")";
    head.appendChild(el("h2", "file-title", title));
    head.appendChild(downloadButton(file.json, "health-record-" + n + ".json"));
    if (file.lastUpdated) section.appendChild(el("p", "muted file-meta", "Last updated " + fmtDate(file.lastUpdated)));
    section.appendChild(renderFhir(file.json));
    return section;
  }

  // ------------------------------------------------------------------ page state

  function showMessage(kind, title, text) {
    var box = $("message");
    box.className = "notice notice-" + kind;
    $("message-title").textContent = title;
    $("message-text").textContent = text || "";
    box.hidden = false;
  }

  function hideMessage() {
    $("message").hidden = true;
  }

  function progress(text) {
    var p = $("progress");
    p.textContent = text || "";
    p.hidden = !text;
  }

  function clearRecord() {
    blobUrls.forEach(function (u) { URL.revokeObjectURL(u); });
    blobUrls = [];
    var rec = $("record");
    while (rec.firstChild) rec.removeChild(rec.firstChild);
    rec.hidden = true;
  }

  function resetPage() {
    hideMessage();
    progress("");
    clearRecord();
    $("link-info").hidden = true;
    $("access-form").hidden = true;
    state = { link: null, keyBytes: null, passcode: null, lastRemaining: null, busy: false };
  }

  function showLinkInfo(link) {
    $("link-label").textContent = link.label || "Shared health record";
    var meta = ["From " + hostOf(link.url)];
    if (link.flag.indexOf("P") >= 0) meta.push("passcode required");
    if (link.flag.indexOf("L") >= 0) meta.push("long-term link: the patient may update it");
    if (link.exp) meta.push((link.exp * 1000 < Date.now() ? "expired " : "expires ") + formatEpoch(link.exp));
    $("link-meta").textContent = meta.join(" · ");
    var info = $("link-info");
    var old = info.querySelector(".refresh");
    if (old) old.remove();
    info.hidden = false;
    document.title = (link.label ? link.label + " · " : "") + "Health record viewer";
  }

  function showAccessForm(link) {
    var form = $("access-form");
    var needsPasscode = link.flag.indexOf("P") >= 0;
    $("passcode-field").hidden = !needsPasscode;
    $("passcode").required = needsPasscode;
    $("passcode").value = "";
    form.hidden = false;
    if (needsPasscode) $("passcode").focus();
    else $("open-button").focus();
  }

  function storedRecipient() {
    var s = storage();
    var value = s ? s.getItem(RECIPIENT_KEY) : null;
    return value && value.trim() ? value.trim() : null;
  }

  async function openRecord() {
    if (state.busy || !state.link) return;
    var link = state.link;
    var mine = generation;
    var recipient = $("recipient").value.trim();
    if (!recipient) {
      showMessage("error", "Who is asking?", "Enter your name or organisation: the server needs it for the patient's access log.");
      $("recipient").focus();
      return;
    }
    var s = storage();
    if (s) s.setItem(RECIPIENT_KEY, recipient);
    var passcode = null;
    if (link.flag.indexOf("P") >= 0) {
      passcode = state.passcode !== null && $("access-form").hidden ? state.passcode : $("passcode").value;
      if (!passcode) {
        showMessage("error", "Enter the passcode", "This link needs the passcode the patient gave you.");
        $("passcode").focus();
        return;
      }
    }
    if (!window.crypto || !crypto.subtle) {
      showMessage("error", "This page cannot decrypt here",
        "Browsers only allow decryption on secure pages: open the viewer over HTTPS.");
      return;
    }
    state.busy = true;
    $("open-button").disabled = true;
    hideMessage();
    clearRecord();
    try {
      progress("Asking " + hostOf(link.url) + " for the record…");
      var listing = await fetchFiles(link, recipient, passcode);
      if (mine !== generation) return;
      state.passcode = passcode;
      $("access-form").hidden = true;
      if (!listing.files.length) throw new ViewerError("empty", "The link holds no files", "There is nothing to show.");
      progress("Decrypting " + plural(listing.files.length, "file", "files") + "…");
      var loaded = await Promise.all(listing.files.map(function (f) {
        return loadFile(f, state.keyBytes).catch(function (err) {
          if (err instanceof ViewerError) return { error: err };
          return { error: new ViewerError("format", "A file could not be read", String(err && err.message)) };
        });
      }));
      if (mine !== generation) return;
      var rec = $("record");
      for (var i = 0; i < loaded.length; i++) rec.appendChild(await renderFile(loaded[i], i + 1));
      rec.hidden = false;
      var failures = loaded.filter(function (f) { return f.error; });
      if (failures.length === loaded.length) {
        showMessage(failures[0].error.kind === "decrypt" ? "error" : "error", failures[0].error.title, failures[0].error.text);
      } else if (failures.length) {
        showMessage("warning", plural(failures.length, "file", "files") + " of " + loaded.length + " could not be shown",
          "The rest of the record is below.");
      }
      if (link.flag.indexOf("L") >= 0) addRefresh();
      var first = rec.querySelector("h2");
      if (first) {
        first.setAttribute("tabindex", "-1");
        first.focus({ preventScroll: true });
      }
    } catch (err) {
      if (mine !== generation) return;
      var e = err instanceof ViewerError ? err : new ViewerError("error", "Something went wrong", String(err && err.message));
      showMessage("error", e.title, e.text);
      if (e.kind === "passcode" && e.remaining !== 0) {
        showAccessForm(link);
      } else if (e.kind === "passcode" || e.kind === "dead" || e.kind === "locked") {
        $("access-form").hidden = true;
      } else if ($("access-form").hidden && e.kind !== "decrypt") {
        showAccessForm(link); // network trouble, rate limits: let the person try again
      }
    } finally {
      if (mine === generation) {
        progress("");
        state.busy = false;
        $("open-button").disabled = false;
      }
    }
  }

  function addRefresh() {
    var info = $("link-info");
    if (info.querySelector(".refresh")) return;
    var button = el("button", "button small refresh", "Check for updates", { type: "button" });
    button.addEventListener("click", function () { openRecord(); });
    info.appendChild(button);
  }

  function route() {
    generation += 1;
    resetPage();
    $("open-button").disabled = false;
    var hash = location.hash ? location.hash.slice(1) : "";
    if (!hash) {
      $("open-title").textContent = "Open a link";
      return;
    }
    $("open-title").textContent = "Open another link";
    var link;
    try {
      link = parseLink(hash);
    } catch (err) {
      var e = err instanceof ViewerError ? err : new ViewerError("not-a-link", "This is not a SMART Health Link", "");
      showMessage("error", e.title, e.text);
      return;
    }
    state.link = link;
    state.keyBytes = link.keyBytes;
    showLinkInfo(link);
    $("recipient").value = storedRecipient() || DEFAULT_RECIPIENT;
    if (link.flag.indexOf("P") < 0 && storedRecipient()) {
      openRecord();
    } else {
      showAccessForm(link);
    }
  }

  /** Open a pasted or scanned link by putting it in the fragment (the page's own address). */
  function openText(text) {
    var raw = str(text).trim();
    try {
      parseLink(raw);
    } catch (err) {
      showMessage("error", err.title || "This is not a SMART Health Link", err.text || "");
      return false;
    }
    var at = raw.indexOf(PREFIX);
    var hash = "#" + raw.slice(at).replace(/\s+/g, "");
    if (location.hash === hash) route();
    else location.hash = hash; // hashchange renders it
    return true;
  }

  // ------------------------------------------------------------------ wiring

  function init() {
    $("access-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      openRecord();
    });
    $("paste-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (openText($("paste").value)) $("paste").value = "";
    });
    window.ShlScanner({
      button: "scan-button", stop: "scan-stop", status: "scan-status", video: "scan-video",
      jsqr: $("viewer").getAttribute("data-jsqr"), onLink: openText,
    });
    window.addEventListener("hashchange", route);
    route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
