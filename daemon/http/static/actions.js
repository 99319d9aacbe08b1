// Action buttons: POST to the admin API route in data-url (same origin, session cookie), then reload.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.action");
  if (!button) return;
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  const response = await fetch(button.dataset.url, { method: "POST", credentials: "same-origin" });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    window.alert(`${button.textContent.trim()} failed: ${detail}`);
    button.disabled = false;
    return;
  }
  window.location.reload();
});
