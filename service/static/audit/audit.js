// Optional: typing a date picks "Custom"; choosing a preset clears the dates.
document.addEventListener("DOMContentLoaded", () => {
  const range = document.getElementById("range");
  const dates = ["from", "to"].map((id) => document.getElementById(id)).filter(Boolean);
  if (!range) return;
  for (const input of dates) {
    input.addEventListener("input", () => { if (input.value) range.value = "custom"; });
  }
  range.addEventListener("change", () => {
    if (range.value !== "custom") for (const input of dates) input.value = "";
  });
});

// An export of more entries than one request returns (SCIMLEDGER_MAX_EXPORT_ENTRIES) comes in
// pages, each naming the next in its Link header (a CSV continuation has no header row): the
// script fetches them one after the other and saves them as one file. Without it, the link
// saves the first page.
function nextPage(link) {
  const found = /<([^>]+)>;\s*rel="next"/.exec(link || "");
  return found ? new URL(found[1], window.location.href).href : null;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const link of document.querySelectorAll("a[data-export]")) {
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      if (link.getAttribute("aria-busy") === "true") return;
      link.setAttribute("aria-busy", "true");
      const parts = [];
      let type = "application/octet-stream";
      let name = "provisioning-log";
      try {
        let url = link.href;
        while (url) {
          const reply = await fetch(url, { credentials: "same-origin" });
          if (!reply.ok) {
            window.location.href = url; // the page's own message (signed out, a bad filter)
            return;
          }
          if (!parts.length) {
            type = reply.headers.get("Content-Type") || type;
            const named = /filename="([^"]+)"/.exec(reply.headers.get("Content-Disposition") || "");
            if (named) name = named[1];
          }
          parts.push(await reply.blob()); // rejects if the reply was cut: no partial file
          url = nextPage(reply.headers.get("Link"));
        }
        const saved = document.createElement("a");
        saved.href = URL.createObjectURL(new Blob(parts, { type }));
        saved.download = name;
        document.body.append(saved);
        saved.click();
        saved.remove();
        setTimeout(() => URL.revokeObjectURL(saved.href), 60_000);
      } catch (error) {
        window.alert(`The export failed before it was complete: ${error}. Nothing was saved.`);
      } finally {
        link.removeAttribute("aria-busy");
      }
    });
  }
});
