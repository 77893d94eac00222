// Enter sends, Shift+Enter starts a new line; the log follows new text while it is scrolled to the end.
document.addEventListener("keydown", (e) => {
  if (e.target.id === "prompt" && e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); e.target.form.requestSubmit(); }
});
const log = () => document.getElementById("log");
for (const n of ["htmx:beforeSwap", "htmx:oobBeforeSwap"]) document.addEventListener(n, () => { const l = log(); if (l) l.dataset.pinned = l.scrollHeight - l.scrollTop - l.clientHeight < 40; });
for (const n of ["htmx:afterSettle", "htmx:oobAfterSwap"]) document.addEventListener(n, () => { const l = log(); if (l && l.dataset.pinned !== "false") l.scrollTop = l.scrollHeight; });
// A sent message clears the composer (here, not in an hx-on attribute: the page's
// Content-Security-Policy allows no evaluated script).
document.addEventListener("htmx:afterRequest", (e) => { if (e.target.id === "composer" && e.detail.successful) e.target.reset(); });
// A search the server refuses (too long, too slow) comes back as a 400 whose body says why: show it.
document.addEventListener("htmx:beforeSwap", (e) => { if (e.detail.target.id === "search-results" && e.detail.xhr.status === 400) { e.detail.shouldSwap = true; e.detail.isError = false; } });
