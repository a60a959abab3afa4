// The shop's checkout script. The card fields are the vault's frame: this page never
// sees the number, only the pm_… id that the vault gives it, which it posts to the
// shop's own server (POST /orders). The server pays by asking the vault to forward the
// card to the acquirer, and answers the order.
"use strict";
var cv = CardVault(document.body.dataset.pk);
var card = cv.elements().create("card");
card.mount("#card");
window.cardReady = false;
card.on("ready", function () { window.cardReady = true; });

var form = document.getElementById("payment-form");
var result = document.getElementById("result");
var pay = document.getElementById("pay");
card.on("submit", function () { form.requestSubmit(); });

function show(state, text) {
  result.dataset.state = state;
  result.textContent = text;
}

function link(href, text) {
  var a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}

form.addEventListener("submit", async function (event) {
  event.preventDefault();
  pay.disabled = true;
  result.textContent = "";
  result.removeAttribute("data-state");
  result.removeAttribute("data-order");
  try {
    var outcome = await cv.createPaymentMethod(card, {
      billing_details: { name: document.getElementById("name").value }
    });
    if (outcome.error) {
      show("error", outcome.error.message);
      return;
    }
    var response = await fetch("/orders", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ payment_method: outcome.paymentMethod.id })
    });
    var answer = await response.json();
    var order = answer.order;
    if (!order) {
      show("error", (answer.error && answer.error.message) || "The payment could not be made.");
      return;
    }
    result.dataset.order = order.id;
    var card_text = order.brand_name + " ending in " + order.last4;
    if (order.status === "approved") {
      show("approved", "Paid " + order.amount_text + " with " + card_text + ". Order " + order.id + ". ");
    } else if (order.status === "declined") {
      show("declined", "Your card was declined (" + (order.decline_code || "declined") + "). ");
    } else {
      show("error", "The payment could not be made (" + (order.error || "error") + "). ");
    }
    result.appendChild(link("/orders#" + order.id, "See your orders"));
    if (order.status !== "approved") { card.clear(); }
  } catch (e) {
    show("error", "The payment could not be made.");
  } finally {
    pay.disabled = false;
  }
});
