// The shop's checkout script. The card fields are the vault's frame: this page never
// sees the number, only the pm_… id that the vault gives it, which it posts to the
// shop's own server (POST /orders) with the order attempt the server rendered the page
// with. The server pays by asking the vault to forward the card to the acquirer, and
// answers the order.
//
// Paying once, whatever the customer does:
// - one order attempt (att_…) per order, from the server: every submission of it, a
//   double click, a retry, the same page sent again, is the same order on the server,
//   which answers the first outcome (it never charges an attempt twice);
// - Pay is disabled from the click until the answer, and a submission while one is
//   under way is ignored (Enter in the card fields submits without the button);
// - once paid, the card fields are gone and Pay stays disabled: the page is a receipt;
// - after a decline or a failure the server gives the next attempt, and Pay is enabled
//   again; when the outcome is unknown (503) the attempt stays the same, so trying
//   again asks the server about the same order and cannot charge twice.
"use strict";
var cv = CardVault(document.body.dataset.pk);
var card = cv.elements().create("card");
card.mount("#card");
window.cardReady = false;
card.on("ready", function () { window.cardReady = true; });

var form = document.getElementById("payment-form");
var result = document.getElementById("result");
var pay = document.getElementById("pay");
var attempt = form.dataset.attempt;
var busy = false;
var paid = false;
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

// The receipt: the card fields go, Pay stays disabled, and a new order is a new attempt
// (a POST to the server, which sets it).
function becomeReceipt() {
  paid = true;
  pay.disabled = true;
  pay.textContent = "Paid";
  document.getElementById("name").disabled = true;
  card.unmount();
  form.dataset.paid = "true";
  var again = document.createElement("form");
  again.method = "post";
  again.action = "/checkout/new";
  var button = document.createElement("button");
  button.type = "submit";
  button.className = "secondary";
  button.textContent = "Start a new order";
  again.appendChild(button);
  form.after(again);
}

form.addEventListener("submit", async function (event) {
  event.preventDefault();
  if (busy || paid) { return; }
  busy = true;
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
      body: JSON.stringify({ attempt: attempt, payment_method: outcome.paymentMethod.id })
    });
    var answer = await response.json();
    if (answer.next_attempt) { attempt = answer.next_attempt; }
    var order = answer.order;
    if (!order) {
      show("error", (answer.error && answer.error.message) || "The payment could not be made.");
      return;
    }
    result.dataset.order = order.id;
    var card_text = order.brand_name + " ending in " + order.last4;
    if (order.status === "approved") {
      show("approved", "Paid " + order.amount_text + " with " + card_text + ". Order " + order.id + ". ");
      becomeReceipt();
    } else if (order.status === "declined") {
      show("declined", "Your card was declined (" + (order.decline_code || "declined") + "). ");
      card.clear();
    } else if (order.status === "pending") {
      // Unknown outcome: the same attempt again is safe, a new one is not.
      show("error", (answer.error && answer.error.message) || "The payment could not be confirmed. ");
    } else {
      show("error", "The payment could not be made (" + (order.error || "error") + "). ");
      card.clear();
    }
    result.appendChild(link("/orders#" + order.id, "See your orders"));
  } catch (e) {
    show("error", "The payment could not be made.");
  } finally {
    busy = false;
    if (!paid) { pay.disabled = false; }
  }
});
