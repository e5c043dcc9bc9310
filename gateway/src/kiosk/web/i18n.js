// Texts for both pages: every word on them comes from /i18n/<code>.json (served from the binary).
// Elements with data-t="…" get that text; code asks t(key, {var: value}) ({var} in a text is replaced).
"use strict";

const KioskI18n = (() => {
  let languages = []; // [{code, name}], the default first
  let texts = {};
  let current = null;
  const listeners = [];

  function t(key, vars) {
    let s = Object.prototype.hasOwnProperty.call(texts, key) ? texts[key] : key;
    if (vars) {
      for (const [k, v] of Object.entries(vars)) {
        s = s.split("{" + k + "}").join(String(v));
      }
    }
    return s;
  }

  // Whether the current language has a text for `key` (codes from the server without one are shown as
  // they are).
  function has(key) {
    return Object.prototype.hasOwnProperty.call(texts, key);
  }

  function apply(root) {
    for (const el of (root || document).querySelectorAll("[data-t]")) {
      el.textContent = t(el.dataset.t);
    }
    for (const el of (root || document).querySelectorAll("[data-t-placeholder]")) {
      el.placeholder = t(el.dataset.tPlaceholder);
    }
  }

  async function use(code) {
    const r = await fetch("/i18n/" + encodeURIComponent(code));
    if (!r.ok) return;
    texts = await r.json();
    current = code;
    document.documentElement.lang = code;
    if (texts.page_title && document.body.dataset.titleKey) {
      document.title = t(document.body.dataset.titleKey);
    }
    apply();
    for (const b of document.querySelectorAll("[data-lang]")) {
      b.setAttribute("aria-pressed", b.dataset.lang === code ? "true" : "false");
    }
    for (const f of listeners) f(code);
  }

  // Builds the language switch (one button per language, each named in its own language) in `container`.
  async function init(container) {
    const r = await fetch("/i18n");
    languages = await r.json();
    for (const l of languages) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "lang";
      b.dataset.lang = l.code;
      b.id = "lang-" + l.code;
      b.textContent = l.name;
      b.addEventListener("click", () => use(l.code));
      container.appendChild(b);
    }
    await use(languages[0].code);
  }

  return {
    t,
    has,
    apply,
    use,
    init,
    onChange: (f) => listeners.push(f),
    current: () => current,
    defaultCode: () => (languages[0] ? languages[0].code : null),
  };
})();
