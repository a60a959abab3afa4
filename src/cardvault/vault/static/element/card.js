/* cardvault card-entry frame.
 *
 * Runs inside the iframe that cardvault.js mounts, on the vault's own origin. The card
 * number, expiry and CVC typed here go to one place only: POST /v1/payment_methods on
 * this same origin (the Content-Security-Policy's connect-src 'self' enforces that).
 * The merchant's page, on another origin, cannot read these fields; it gets messages
 * about the state of the form (brand, complete, error) and, at the end, the pm_ object,
 * posted to its exact origin only. Messages are accepted only from that origin.
 *
 * No innerHTML anywhere: text goes in with textContent.
 */
(function () {
  "use strict";

  var body = document.body;
  var PARENT_ORIGIN = body.getAttribute("data-parent-origin") || "";
  var KEY = body.getAttribute("data-key") || "";
  var form = document.getElementById("card-form");
  var numberInput = document.getElementById("cardnumber");
  var expInput = document.getElementById("exp-date");
  var cvcInput = document.getElementById("cvc");
  var brandLabel = document.getElementById("brand");
  var errorLine = document.getElementById("card-error");

  function disable(message) {
    form.hidden = true;
    var p = document.createElement("p");
    p.textContent = message;
    body.appendChild(p);
  }

  // The server already refused any origin not configured for the key, and the browser
  // enforces frame-ancestors; these checks make a mistake in either visible at once.
  if (window.parent === window) {
    disable("This card form works only inside a checkout page.");
    return;
  }
  var ancestors = window.location.ancestorOrigins;
  if (!/^https:\/\//.test(PARENT_ORIGIN) || (ancestors && ancestors.length > 0 && ancestors[0] !== PARENT_ORIGIN)) {
    disable("This card form cannot be used on this page.");
    return;
  }

  // -- brands (the same IIN ranges as cardvault.cards.brands) ---------------------------

  var RANGES = [
    [4, 4, "visa"], [51, 55, "mastercard"], [2221, 2720, "mastercard"],
    [34, 34, "amex"], [37, 37, "amex"], [6011, 6011, "discover"], [644, 649, "discover"],
    [65, 65, "discover"], [300, 305, "diners"], [309, 309, "diners"], [36, 36, "diners"],
    [38, 39, "diners"], [3528, 3589, "jcb"], [62, 62, "unionpay"], [81, 81, "unionpay"]
  ];
  var BRANDS = {
    visa: { name: "Visa", lengths: [13, 16, 19], typical: 16, cvc: [3] },
    mastercard: { name: "Mastercard", lengths: [16], typical: 16, cvc: [3] },
    amex: { name: "American Express", lengths: [15], typical: 15, cvc: [4] },
    discover: { name: "Discover", lengths: [16, 17, 18, 19], typical: 16, cvc: [3] },
    diners: { name: "Diners Club", lengths: [14, 15, 16, 17, 18, 19], typical: 14, cvc: [3] },
    jcb: { name: "JCB", lengths: [16, 17, 18, 19], typical: 16, cvc: [3] },
    unionpay: { name: "UnionPay", lengths: [16, 17, 18, 19], typical: 16, cvc: [3] },
    unknown: { name: "", lengths: [13, 14, 15, 16, 17, 18, 19], typical: 16, cvc: [3, 4] }
  };

  function detectBrand(digits) {
    for (var i = 0; i < RANGES.length; i++) {
      var first = RANGES[i][0], last = RANGES[i][1];
      var width = String(first).length;
      if (digits.length >= width) {
        var lead = parseInt(digits.slice(0, width), 10);
        if (lead >= first && lead <= last) return RANGES[i][2];
      }
    }
    return "unknown";
  }

  function luhn(digits) {
    var sum = 0;
    for (var i = 0; i < digits.length; i++) {
      var n = digits.charCodeAt(digits.length - 1 - i) - 48;
      if (i % 2 === 1) { n *= 2; if (n > 9) n -= 9; }
      sum += n;
    }
    return digits.length > 0 && sum % 10 === 0;
  }

  function onlyDigits(text) { return text.replace(/[^0-9]/g, ""); }
  function maxOf(list) { return Math.max.apply(null, list); }

  // -- the three fields: value -> state --------------------------------------------------

  var MESSAGES = {
    incomplete_number: "Your card number is incomplete.",
    invalid_number: "Your card number is invalid.",
    incomplete_expiry: "Your card's expiration date is incomplete.",
    invalid_expiry_month: "Your card's expiration month is invalid.",
    invalid_expiry_year: "Your card's expiration year is invalid.",
    invalid_expiry_month_past: "Your card's expiration date is in the past.",
    invalid_expiry_year_past: "Your card's expiration date is in the past.",
    incomplete_cvc: "Your card's security code is incomplete.",
    invalid_cvc: "Your card's security code is invalid."
  };

  // Each check returns {state: "empty"|"incomplete"|"invalid"|"complete", code}.
  // "invalid" is shown while typing; "incomplete" only once the field was left or the
  // form submitted.
  function checkNumber() {
    var digits = onlyDigits(numberInput.value);
    if (!digits) return { state: "empty", code: "incomplete_number" };
    var info = BRANDS[detectBrand(digits)];
    var fits = info.lengths.indexOf(digits.length) >= 0;
    if (fits && luhn(digits)) return { state: "complete", code: null };
    // Too long, or a usual length that fails the check digit: say so while typing.
    if (digits.length >= maxOf(info.lengths) || (fits && digits.length >= info.typical)) {
      return { state: "invalid", code: "invalid_number" };
    }
    return { state: "incomplete", code: "incomplete_number" };
  }

  function parseExpiry() {
    var digits = onlyDigits(expInput.value);
    return { month: digits.slice(0, 2), year: digits.slice(2, 4) };
  }

  function checkExpiry() {
    var e = parseExpiry();
    if (!e.month) return { state: "empty", code: "incomplete_expiry" };
    if (e.month.length === 2) {
      var m = parseInt(e.month, 10);
      if (m < 1 || m > 12) return { state: "invalid", code: "invalid_expiry_month" };
    }
    if (e.year.length < 2) return { state: "incomplete", code: "incomplete_expiry" };
    var now = new Date();
    var year = 2000 + parseInt(e.year, 10);
    var month = parseInt(e.month, 10);
    var thisYear = now.getUTCFullYear();
    if (year < thisYear) return { state: "invalid", code: "invalid_expiry_year_past" };
    if (year === thisYear && month < now.getUTCMonth() + 1) {
      return { state: "invalid", code: "invalid_expiry_month_past" };
    }
    if (year > thisYear + 50) return { state: "invalid", code: "invalid_expiry_year" };
    return { state: "complete", code: null };
  }

  function currentBrand() {
    var digits = onlyDigits(numberInput.value);
    return digits ? detectBrand(digits) : "unknown";
  }

  function checkCvc() {
    var digits = onlyDigits(cvcInput.value);
    if (!digits) return { state: "empty", code: "incomplete_cvc" };
    var lengths = BRANDS[currentBrand()].cvc;
    if (lengths.indexOf(digits.length) >= 0) return { state: "complete", code: null };
    if (digits.length > maxOf(lengths)) return { state: "invalid", code: "invalid_cvc" };
    return { state: "incomplete", code: "incomplete_cvc" };
  }

  // -- formatting as the customer types ---------------------------------------------------

  function groupsFor(brand, length) {
    if (brand === "amex") return [4, 6, 5];
    if (brand === "diners" && length === 14) return [4, 6, 4];
    return [4, 4, 4, 4, 3];
  }

  function formatNumber(digits) {
    var brand = detectBrand(digits);
    var groups = groupsFor(brand, digits.length);
    var out = [], at = 0;
    for (var i = 0; i < groups.length && at < digits.length; i++) {
      out.push(digits.slice(at, at + groups[i]));
      at += groups[i];
    }
    return out.join(" ");
  }

  // Keep the caret after the same number of digits when spaces move around it.
  function reformat(input, digits, formatted) {
    var focused = document.activeElement === input;
    var caretDigits = focused
      ? onlyDigits(input.value.slice(0, input.selectionStart || 0)).length
      : digits.length;
    if (input.value !== formatted) input.value = formatted;
    if (!focused) return;
    var pos = 0, seen = 0;
    while (pos < formatted.length && seen < caretDigits) {
      if (/[0-9]/.test(formatted.charAt(pos))) seen++;
      pos++;
    }
    input.setSelectionRange(pos, pos);
  }

  function onNumberInput() {
    var digits = onlyDigits(numberInput.value);
    var info = BRANDS[detectBrand(digits)];
    digits = digits.slice(0, maxOf(info.lengths));
    reformat(numberInput, digits, formatNumber(digits));
    serverError = null;
    update();
    var n = checkNumber();
    if (n.state === "complete" && digits.length === info.typical) expInput.focus();
  }

  function onExpiryInput() {
    var raw = expInput.value;
    var digits;
    var slash = raw.indexOf("/");
    if (slash >= 0) {
      // "12/34", "1/34" and an autofilled "12/2034" all mean December 2034.
      var m = onlyDigits(raw.slice(0, slash));
      var y = onlyDigits(raw.slice(slash + 1));
      if (m.length === 1) m = "0" + m;
      if (y.length === 4) y = y.slice(2);
      digits = (m + y).slice(0, 4);
    } else {
      digits = onlyDigits(raw).slice(0, 4);
    }
    if (digits.length === 1 && digits > "1") digits = "0" + digits;
    var formatted = digits.length > 2 ? digits.slice(0, 2) + " / " + digits.slice(2) : digits;
    reformat(expInput, digits, formatted);
    serverError = null;
    update();
    if (digits.length === 4 && checkExpiry().state === "complete") cvcInput.focus();
  }

  function onCvcInput() {
    var digits = onlyDigits(cvcInput.value).slice(0, 4);
    reformat(cvcInput, digits, digits);
    serverError = null;
    update();
  }

  // -- showing state, telling the page ------------------------------------------------------

  var touched = { number: false, expiry: false, cvc: false };
  var serverError = null;
  var fields = [
    { name: "number", input: numberInput, check: checkNumber },
    { name: "expiry", input: expInput, check: checkExpiry },
    { name: "cvc", input: cvcInput, check: checkCvc }
  ];

  // The error a field shows now: invalid at once; incomplete (or empty, on submit) only
  // once the customer has left the field, so that typing is not interrupted.
  function shownCode(field) {
    var r = field.check();
    if (r.state === "invalid") return r.code;
    if (!touched[field.name]) return null;
    if (r.state === "incomplete") return r.code;
    if (r.state === "empty" && touched[field.name] === "submit") return r.code;
    return null;
  }

  var lastSent = "";

  function update() {
    var firstCode = null;
    for (var i = 0; i < fields.length; i++) {
      var code = shownCode(fields[i]);
      fields[i].input.setAttribute("aria-invalid", code ? "true" : "false");
      if (code && !firstCode) firstCode = code;
    }
    var brand = currentBrand();
    brandLabel.textContent = onlyDigits(numberInput.value) ? BRANDS[brand].name : "";
    var message = firstCode ? MESSAGES[firstCode] : serverError ? serverError.message : "";
    if (errorLine.textContent !== message) errorLine.textContent = message;

    var empty = true, complete = true;
    for (var j = 0; j < fields.length; j++) {
      var state = fields[j].check().state;
      if (state !== "empty") empty = false;
      if (state !== "complete") complete = false;
    }
    var error = firstCode
      ? { type: "validation_error", code: firstCode, message: MESSAGES[firstCode] }
      : serverError;
    // Only facts about the form go to the page: never a value typed into it.
    var change = { type: "cardvault:change", empty: empty, complete: complete, brand: brand, error: error };
    var key = JSON.stringify(change);
    if (key !== lastSent) {
      lastSent = key;
      post(change);
    }
  }

  function post(message) {
    // The exact origin the vault checked against the account's allowed origins: if the
    // frame were somehow elsewhere, the browser would drop the message.
    window.parent.postMessage(message, PARENT_ORIGIN);
  }

  // -- creating the payment method ----------------------------------------------------------

  var busy = false;

  function billingParams(params, details) {
    if (!details || typeof details !== "object") return;
    ["name", "email", "phone"].forEach(function (k) {
      if (typeof details[k] === "string" && details[k]) params.append("billing_details[" + k + "]", details[k].slice(0, 200));
    });
    var address = details.address;
    if (address && typeof address === "object") {
      ["line1", "line2", "city", "state", "postal_code", "country"].forEach(function (k) {
        if (typeof address[k] === "string" && address[k]) {
          params.append("billing_details[address][" + k + "]", address[k].slice(0, 200));
        }
      });
    }
  }

  function reply(id, result) {
    post({ type: "cardvault:result", id: id, paymentMethod: result.paymentMethod || null, error: result.error || null });
  }

  function firstInvalidField() {
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].check().state !== "complete") return fields[i];
    }
    return null;
  }

  function create(message) {
    var id = typeof message.id === "string" ? message.id.slice(0, 64) : "";
    if (busy) {
      reply(id, { error: { type: "invalid_request_error", code: "request_in_progress", message: "A payment method is already being created." } });
      return;
    }
    touched = { number: "submit", expiry: "submit", cvc: "submit" };
    update();
    var bad = firstInvalidField();
    if (bad) {
      // Nothing is sent anywhere: the vault never sees a number that cannot be a card.
      var code = bad.check().code;
      bad.input.focus();
      reply(id, { error: { type: "validation_error", code: code, message: MESSAGES[code] } });
      return;
    }
    var exp = parseExpiry();
    var params = new URLSearchParams();
    params.append("type", "card");
    params.append("card[number]", onlyDigits(numberInput.value));
    params.append("card[exp_month]", exp.month);
    params.append("card[exp_year]", "20" + exp.year);
    params.append("card[cvc]", onlyDigits(cvcInput.value));
    billingParams(params, message.billing_details);
    busy = true;
    fields.forEach(function (f) { f.input.readOnly = true; });
    fetch("/v1/payment_methods", {
      method: "POST",
      mode: "same-origin",
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      referrerPolicy: "no-referrer",
      headers: { "Authorization": "Bearer " + KEY, "Content-Type": "application/x-www-form-urlencoded" },
      body: params.toString()
    }).then(function (response) {
      return response.json().then(function (data) { return { ok: response.ok, data: data }; });
    }).then(function (result) {
      if (result.ok && result.data && result.data.object === "payment_method") {
        serverError = null;
        update();
        reply(id, { paymentMethod: result.data });
        return;
      }
      var e = (result.data && result.data.error) || {};
      var error = {
        type: typeof e.type === "string" ? e.type : "api_error",
        code: typeof e.code === "string" ? e.code : undefined,
        message: typeof e.message === "string" ? e.message : "The card could not be saved.",
        param: typeof e.param === "string" ? e.param : undefined
      };
      serverError = error;
      update();
      reply(id, { error: error });
    }).catch(function () {
      var error = { type: "api_connection_error", message: "The card vault could not be reached. Try again." };
      serverError = error;
      update();
      reply(id, { error: error });
    }).then(function () {
      busy = false;
      fields.forEach(function (f) { f.input.readOnly = false; });
    });
  }

  function clearAll() {
    fields.forEach(function (f) { f.input.value = ""; });
    touched = { number: false, expiry: false, cvc: false };
    serverError = null;
    update();
  }

  // -- wiring ---------------------------------------------------------------------------------

  numberInput.addEventListener("input", onNumberInput);
  expInput.addEventListener("input", onExpiryInput);
  cvcInput.addEventListener("input", onCvcInput);
  fields.forEach(function (f, i) {
    f.input.addEventListener("blur", function () {
      if (f.input.value && !touched[f.name]) touched[f.name] = "blur";
      update();
    });
    f.input.addEventListener("keydown", function (event) {
      // Enter pays, as in any form: the page decides what that means ("submit" event).
      // (A form of three text fields and no button would not submit by itself.)
      if (event.key === "Enter" && !event.isComposing) {
        event.preventDefault();
        post({ type: "cardvault:submit" });
        return;
      }
      // Backspace in an empty field goes back to the one before, as on a paper form.
      if (event.key === "Backspace" && !f.input.value && i > 0) {
        event.preventDefault();
        var prev = fields[i - 1].input;
        prev.focus();
        prev.setSelectionRange(prev.value.length, prev.value.length);
      }
    });
  });
  // Never submitted as a form (and form-action 'none' would stop it): values stay here.
  form.addEventListener("submit", function (event) { event.preventDefault(); });

  window.addEventListener("message", function (event) {
    if (event.origin !== PARENT_ORIGIN || event.source !== window.parent) return;
    var data = event.data;
    if (!data || typeof data !== "object") return;
    if (data.type === "cardvault:create") create(data);
    else if (data.type === "cardvault:focus") numberInput.focus();
    else if (data.type === "cardvault:clear") clearAll();
  });

  function reportSize() {
    post({ type: "cardvault:resize", height: Math.ceil(document.documentElement.scrollHeight) });
  }
  if (typeof ResizeObserver === "function") new ResizeObserver(reportSize).observe(body);
  update();
  reportSize();
  post({ type: "cardvault:ready" });
})();
