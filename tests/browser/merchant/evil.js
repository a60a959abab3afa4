// A page on an origin the account has not configured, using the account's (public)
// publishable key. It tries twice: honestly, through cardvault.js (which names this
// page's origin), and by building the frame URL itself with the merchant's origin.
"use strict";
window.cardReady = false;
var cv = CardVault(document.body.dataset.pk);
var card = cv.elements().create("card");
card.on("ready", function () { window.cardReady = true; });
card.mount("#card");

var forged = document.createElement("iframe");
forged.id = "forged-frame";
forged.src = document.body.dataset.vault + "/element/v1/card.html?" + new URLSearchParams({
  key: document.body.dataset.pk, origin: document.body.dataset.claimedOrigin
}).toString();
document.getElementById("forged").appendChild(forged);
