// Postvern account portal: the only script. It runs the WebAuthn ceremonies (registering a
// passkey, logging in with one), asking for the PRF extension so that a passkey that has it
// becomes a key slot. Everything else on the portal works without it.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  function b64u(buffer) {
    const bytes = new Uint8Array(buffer);
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function unb64u(text) {
    const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
    return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: "The server did not answer." }; }
    if (!response.ok && !data.error) data.error = "Refused (" + response.status + ").";
    return data;
  }

  function showError(text) {
    for (const el of document.querySelectorAll("[data-passkey-error]")) {
      el.textContent = text;
      el.hidden = false;
    }
  }

  function credentialJSON(credential) {
    // The JSON form WebAuthn L3 defines (toJSON), without the client extension results:
    // the PRF output travels on its own.
    const json = credential.toJSON();
    json.clientExtensionResults = {};
    return json;
  }

  function prfOutput(credential) {
    const results = credential.getClientExtensionResults();
    const first = results && results.prf && results.prf.results && results.prf.results.first;
    return first ? b64u(first) : null;
  }

  async function register(button) {
    const nameInput = document.querySelector("[data-passkey-name]");
    const start = await post("/account/passkeys/register/options");
    if (!start.options) return showError(start.error || "Could not start.");
    const options = PublicKeyCredential.parseCreationOptionsFromJSON(start.options);
    const salt = unb64u(start.prfSalt);
    options.extensions = { prf: { eval: { first: salt } } };
    let credential;
    try {
      credential = await navigator.credentials.create({ publicKey: options });
    } catch (e) {
      return showError("No passkey was made: " + e.message);
    }
    let prf = prfOutput(credential);
    const enabled = credential.getClientExtensionResults().prf;
    const body = { name: nameInput ? nameInput.value : "", credential: credentialJSON(credential) };
    if (!prf && enabled && enabled.enabled) {
      // PRF is there but gave no output at creation: one assertion fetches it.
      const again = await post("/account/passkeys/login/options");
      if (again.options) {
        const request = PublicKeyCredential.parseRequestOptionsFromJSON(again.options);
        request.allowCredentials = [{ type: "public-key", id: credential.rawId }];
        request.extensions = { prf: { eval: { first: salt } } };
        try {
          const assertion = await navigator.credentials.get({ publicKey: request });
          prf = prfOutput(assertion);
        } catch (e) { prf = null; }
      }
    }
    if (prf) body.prf = prf;
    const done = await post("/account/passkeys/register", body);
    if (!done.ok) return showError(done.error || "The passkey was refused.");
    window.location.assign("/account/security");
  }

  async function login() {
    const start = await post("/account/passkeys/login/options");
    if (!start.options) return showError(start.error || "Could not start.");
    const options = PublicKeyCredential.parseRequestOptionsFromJSON(start.options);
    options.extensions = { prf: { eval: { first: unb64u(start.prfSalt) } } };
    let credential;
    try {
      credential = await navigator.credentials.get({ publicKey: options });
    } catch (e) {
      return showError("No passkey was used: " + e.message);
    }
    const body = { credential: credentialJSON(credential) };
    const prf = prfOutput(credential);
    if (prf) body.prf = prf;
    const done = await post("/account/passkeys/login", body);
    if (!done.ok) return showError(done.error || "The passkey was refused.");
    window.location.assign(done.next);
  }

  const supported = window.PublicKeyCredential && PublicKeyCredential.parseCreationOptionsFromJSON;
  for (const button of document.querySelectorAll("[data-passkey-register]")) {
    if (!supported) continue;
    button.hidden = false;
    button.addEventListener("click", () => register(button));
  }
  for (const button of document.querySelectorAll("[data-passkey-login]")) {
    if (!supported) continue;
    button.hidden = false;
    button.addEventListener("click", login);
  }
})();
