// MathJax 3 is shipped inside the site (javascripts/mathjax/, copied at build time by
// tools/mkdocs_hooks.py): no formula needs a network to render.
// Markdown pages: pymdownx.arithmatex (generic mode) wraps every formula in an element of
// class "arithmatex" with \( \) or \[ \] delimiters. Notebook pages (mkdocs-jupyter) keep
// Jupyter's $ and $$ in their markdown cells (class "jp-RenderedMarkdown"). Headings with
// math reach the navigation and the table of contents as plain \( \) text inside
// "md-ellipsis" labels. MathJax ignores every element that has a class (the theme's
// chrome, code, outputs) unless the class is one of these; inside them it reads the
// class-less elements (<p>, <li>, ...).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".+",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown|md-ellipsis"
  }
};
document$.subscribe(() => {
  // (on the first page MathJax typesets by itself once loaded; this re-typesets after
  // Material swaps a page's content)
  if (window.MathJax && MathJax.typesetPromise && MathJax.startup && MathJax.startup.output) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
