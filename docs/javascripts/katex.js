// Render the maths that pymdownx.arithmatex (generic mode) wraps in .arithmatex elements,
// with the KaTeX bundled under javascripts/katex/ (no CDN). Runs on every page load,
// including material's instant navigation.
function renderMath(root) {
  root.querySelectorAll(".arithmatex").forEach((el) => {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      errorCallback: (message, err) => console.error(message, err),
    });
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(({ body }) => renderMath(body));
} else {
  document.addEventListener("DOMContentLoaded", () => renderMath(document.body));
}
