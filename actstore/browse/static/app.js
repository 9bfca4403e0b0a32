// actstore feature browser: hover panels on the sample page and more contexts on scroll on a feature page.
// No inline script, no third-party code; strings from the store are set with textContent only.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const box of document.querySelectorAll(".sample-tokens")) {
    const panel = box.nextElementSibling;
    const sae = box.dataset.sae;
    const show = (tok) => {
      panel.replaceChildren();
      const head = document.createElement("b");
      head.textContent = tok.textContent + ": ";
      panel.appendChild(head);
      const feats = JSON.parse(tok.dataset.feats || "[]");
      if (!feats.length) panel.appendChild(document.createTextNode("no active feature"));
      for (const [f, v] of feats) {
        const a = document.createElement("a");
        a.className = "feat";
        a.href = "/sae/" + encodeURIComponent(sae) + "/feature/" + Number(f);
        a.textContent = "feature " + Number(f) + " (" + Number(v).toPrecision(3) + ")";
        panel.appendChild(a);
        panel.appendChild(document.createTextNode(" "));
      }
      for (const t of box.querySelectorAll(".stok.on")) t.classList.remove("on");
      tok.classList.add("on");
    };
    for (const tok of box.querySelectorAll(".stok")) {
      tok.addEventListener("mouseenter", () => show(tok));
      tok.addEventListener("click", () => show(tok));
      tok.addEventListener("focus", () => show(tok));
    }
  }
  const ctx = document.getElementById("contexts");
  const more = document.getElementById("more");
  if (ctx && more && "IntersectionObserver" in window) {
    let page = Number(ctx.dataset.page), busy = false;
    const pages = Number(ctx.dataset.pages);
    const obs = new IntersectionObserver(async (entries) => {
      if (busy || !entries.some((e) => e.isIntersecting)) return;
      busy = true;
      const r = await fetch(ctx.dataset.more + "?page=" + (page + 1));
      if (r.ok) {
        ctx.insertAdjacentHTML("beforeend", await r.text()); // rendered and escaped by the server's templates
        page += 1;
        ctx.dataset.page = String(page);
        more.href = "?page=" + (page + 1);
      }
      if (page + 1 >= pages) { obs.disconnect(); more.remove(); }
      busy = false;
    });
    obs.observe(more);
  }
});
