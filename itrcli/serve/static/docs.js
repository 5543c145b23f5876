// Renders /openapi.json as a list of routes and parameters (textContent only).
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function typeOf(s) {
  if (!s) return "";
  if (s.enum) return s.enum.join(" | ");
  if (s.type === "array") return (s.items && s.items.type || "") + ", repeatable";
  if (s.oneOf) return s.oneOf.map(typeOf).join(" | ");
  return Array.isArray(s.type) ? s.type.join(" | ") : (s.type || "");
}
document.addEventListener("DOMContentLoaded", async () => {
  const out = document.getElementById("paths");
  let spec;
  try { spec = await (await fetch("/openapi.json")).json(); }
  catch (e) { out.append(el("p", "Cannot read /openapi.json: " + e.message)); return; }
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section");
      const h = el("h2");
      h.append(el("span", method.toUpperCase(), "method"), document.createTextNode(" " + path));
      sec.append(h, el("p", op.summary || ""));
      const ps = op.parameters || [];
      if (ps.length) {
        const t = el("table");
        for (const p of ps) {
          const tr = el("tr");
          tr.append(el("td", p.name), el("td", typeOf(p.schema)), el("td", p.description || ""));
          t.append(tr);
        }
        sec.append(t);
      }
      sec.append(el("p", "answers: " + Object.keys(op.responses || {}).join(", "), "codes"));
      out.append(sec);
    }
  }
});
