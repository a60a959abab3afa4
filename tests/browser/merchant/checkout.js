// The merchant's own script. It sees what any merchant script could see, and records it
// in window.seen so that the tests can check that no card data ever reached this page.
"use strict";
window.seen = { messages: [], changes: [], results: [] };
window.addEventListener("message", function (event) {
  window.seen.messages.push({ origin: event.origin, data: JSON.stringify(event.data) });
});

var cv = CardVault(document.body.dataset.pk);
var card = cv.elements().create("card");
card.mount("#card");
window.cardReady = false;
card.on("ready", function () { window.cardReady = true; });
card.on("change", function (e) { window.seen.changes.push(JSON.stringify(e)); });

var form = document.getElementById("payment-form");
var result = document.getElementById("result");
var pay = document.getElementById("pay");
card.on("submit", function () { form.requestSubmit(); });

form.addEventListener("submit", async function (event) {
  event.preventDefault();
  pay.disabled = true;
  result.textContent = "";
  result.removeAttribute("data-state");
  var outcome = await cv.createPaymentMethod(card, {
    billing_details: {
      name: document.getElementById("name").value,
      email: document.getElementById("email").value
    }
  });
  window.seen.results.push(JSON.stringify(outcome));
  if (outcome.error) {
    result.dataset.state = "error";
    result.textContent = outcome.error.message;
  } else {
    // Only the pm_ id goes to the merchant's server.
    await fetch("/pay", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ payment_method: outcome.paymentMethod.id })
    });
    var c = outcome.paymentMethod.card;
    result.dataset.state = "ok";
    result.dataset.pm = outcome.paymentMethod.id;
    result.textContent = "Saved " + c.display_brand.replace("_", " ") + " ending in " + c.last4 +
      " as " + outcome.paymentMethod.id + ".";
  }
  pay.disabled = false;
});
