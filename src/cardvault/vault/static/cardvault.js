/*! cardvault.js v1: the card element for merchants' checkout pages.
 *
 *   <script src="https://VAULT/js/v1/cardvault.js" integrity="sha384-…" crossorigin="anonymous"></script>
 *
 *   const cv = CardVault("pk_test_…");
 *   const card = cv.elements().create("card");
 *   card.mount("#card");
 *   const {paymentMethod, error} = await cv.createPaymentMethod(card, {billing_details: {name}});
 *
 * The card fields live in an iframe served by the vault, on the vault's origin. This
 * page never sees what is typed there: it receives only the pm_ object (or an error),
 * posted by the frame to this page's exact origin, and it accepts messages only from
 * the vault's origin and from its own frame.
 */
(function (global) {
  "use strict";

  var VERSION = "v1";
  var script = document.currentScript;
  // The vault is wherever this file was loaded from; the frame comes from there too.
  var VAULT_ORIGIN = script && script.src ? new URL(script.src).origin : "";
  var PK = /^pk_(test|live)_[A-Za-z0-9]+$/;
  var nextId = 1;

  function fail(message) { throw new Error("CardVault: " + message); }

  function CardElement(vault, type) {
    this._vault = vault;
    this._type = type;
    this._iframe = null;
    this._ready = false;
    this._waiting = [];
    this._handlers = {};
    this._pending = {};
  }

  CardElement.prototype.mount = function (target) {
    var host = typeof target === "string" ? document.querySelector(target) : target;
    if (!host || typeof host.appendChild !== "function") fail("mount() needs an element or a selector that finds one.");
    if (this._iframe) fail("this element is already mounted.");
    var query = new URLSearchParams({ key: this._vault._key, origin: global.location.origin });
    var iframe = document.createElement("iframe");
    iframe.src = VAULT_ORIGIN + "/element/" + VERSION + "/card.html?" + query.toString();
    iframe.title = "Secure card payment input frame";
    iframe.name = "cardvault-card-" + nextId++;
    iframe.setAttribute("referrerpolicy", "no-referrer");
    iframe.setAttribute("allow", "");
    iframe.setAttribute("scrolling", "no");
    iframe.style.border = "0";
    iframe.style.width = "100%";
    iframe.style.height = "150px";
    iframe.style.display = "block";
    iframe.style.overflow = "hidden";
    host.appendChild(iframe);
    this._iframe = iframe;
    this._vault._elements.push(this);
    return this;
  };

  CardElement.prototype.unmount = function () {
    if (this._iframe && this._iframe.parentNode) this._iframe.parentNode.removeChild(this._iframe);
    this._iframe = null;
    this._ready = false;
    var list = this._vault._elements;
    var i = list.indexOf(this);
    if (i >= 0) list.splice(i, 1);
  };

  /** card.on("change" | "ready" | "submit", handler) */
  CardElement.prototype.on = function (event, handler) {
    (this._handlers[event] = this._handlers[event] || []).push(handler);
    return this;
  };

  CardElement.prototype.focus = function () { this._send({ type: "cardvault:focus" }); };
  CardElement.prototype.clear = function () { this._send({ type: "cardvault:clear" }); };

  CardElement.prototype._emit = function (event, payload) {
    (this._handlers[event] || []).forEach(function (h) {
      try { h(payload); } catch (e) { setTimeout(function () { throw e; }); }
    });
  };

  CardElement.prototype._send = function (message) {
    var self = this;
    if (!this._iframe) return;
    if (!this._ready) { this._waiting.push(message); return; }
    // Only the vault's origin may receive it: if the frame were navigated elsewhere, the
    // browser drops the message.
    self._iframe.contentWindow.postMessage(message, VAULT_ORIGIN);
  };

  CardElement.prototype._receive = function (data) {
    switch (data.type) {
      case "cardvault:ready":
        this._ready = true;
        var queued = this._waiting;
        this._waiting = [];
        for (var i = 0; i < queued.length; i++) this._send(queued[i]);
        this._emit("ready", { elementType: this._type });
        break;
      case "cardvault:resize":
        if (typeof data.height === "number" && data.height > 0 && data.height < 2000) {
          this._iframe.style.height = Math.ceil(data.height) + "px";
        }
        break;
      case "cardvault:change":
        this._emit("change", {
          elementType: this._type,
          empty: !!data.empty,
          complete: !!data.complete,
          brand: typeof data.brand === "string" ? data.brand : "unknown",
          error: data.error || undefined
        });
        break;
      case "cardvault:submit":
        this._emit("submit", { elementType: this._type });
        break;
      case "cardvault:result":
        var resolve = this._pending[data.id];
        if (!resolve) return;
        delete this._pending[data.id];
        var pm = data.paymentMethod;
        if (pm && typeof pm.id === "string" && pm.id.indexOf("pm_") === 0) resolve({ paymentMethod: pm });
        else resolve({ error: data.error || { type: "api_error", message: "The card could not be saved." } });
        break;
    }
  };

  function Elements(vault) { this._vault = vault; }

  Elements.prototype.create = function (type) {
    if (type !== "card") fail('only the "card" element exists.');
    return new CardElement(this._vault, type);
  };

  function CardVault(publishableKey) {
    if (!(this instanceof CardVault)) return new CardVault(publishableKey);
    if (typeof publishableKey !== "string" || !PK.test(publishableKey)) {
      fail("pass a publishable key (pk_test_… or pk_live_…). A secret key must never be in a web page.");
    }
    if (!/^https:\/\//.test(VAULT_ORIGIN)) fail("load cardvault.js from the vault, over https.");
    if (global.location.protocol !== "https:") fail("the checkout page must be served over https.");
    this._key = publishableKey;
    this._elements = [];
    var self = this;
    global.addEventListener("message", function (event) {
      // From the vault's origin, and from one of our own frames: anything else is not ours.
      if (event.origin !== VAULT_ORIGIN) return;
      var data = event.data;
      if (!data || typeof data !== "object" || typeof data.type !== "string") return;
      for (var i = 0; i < self._elements.length; i++) {
        var el = self._elements[i];
        if (el._iframe && event.source === el._iframe.contentWindow) {
          el._receive(data);
          return;
        }
      }
    });
  }

  CardVault.prototype.elements = function () { return new Elements(this); };

  /**
   * createPaymentMethod(card, {billing_details}) or, as Stripe.js spells it,
   * createPaymentMethod({type: "card", card, billing_details}).
   * Resolves to {paymentMethod} or {error}; never rejects.
   */
  CardVault.prototype.createPaymentMethod = function (card, data) {
    if (card && !(card instanceof CardElement) && typeof card === "object" && card.card) {
      data = card;
      card = data.card;
    }
    data = data || {};
    return new Promise(function (resolve) {
      if (!(card instanceof CardElement) || !card._iframe) {
        resolve({ error: { type: "invalid_request_error", message: "Mount a card element before creating a payment method." } });
        return;
      }
      var id = "req_" + nextId++ + "_" + Math.random().toString(36).slice(2);
      var timer = setTimeout(function () {
        if (card._pending[id]) {
          delete card._pending[id];
          resolve({ error: { type: "api_connection_error", message: "The card vault did not answer in time." } });
        }
      }, 60000);
      card._pending[id] = function (result) { clearTimeout(timer); resolve(result); };
      card._send({ type: "cardvault:create", id: id, billing_details: data.billing_details || null });
    });
  };

  CardVault.version = VERSION;
  global.CardVault = CardVault;
})(window);
