// The patient page: renders the kiosk's patient screen (Server-Sent Events from /events) and nothing
// else. The page keeps no patient data of its own: every screen replaces the last one, and a lost
// connection hides the screen until the server sends the current one again.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STATES = ["idle", "card_unknown", "checked_in", "measuring", "result"];
  let screen = { state: "idle" };
  let answered = new Set(); // reading ids answered on this page (until the screen leaves the session)
  let lastSpoken = null;

  function sessionOf(s) {
    return typeof s.session === "number" ? s.session : null;
  }

  function show(state) {
    for (const st of STATES) $("s-" + st).hidden = st !== state;
    $("screen").dataset.state = state;
  }

  function render() {
    const t = KioskI18n.t;
    const s = screen;
    show(s.state);
    const session = sessionOf(s);
    $("who").hidden = session === null;
    $("who").textContent = session === null ? "" : t("who", { hint: s.patient_hint });
    $("done").hidden = session === null;
    if (s.state === "measuring") {
      $("measuring-title").textContent = t("measuring_" + s.kind);
      const p = s.cuff_pressure_mmhg;
      const bar = $("progress-bar");
      if (typeof p === "number") {
        bar.classList.remove("indeterminate");
        bar.style.width = Math.min(100, Math.max(0, (p / 300) * 100)) + "%";
        $("cuff").hidden = false;
        $("cuff").textContent = t("cuff_pressure", { value: Math.round(p) });
      } else {
        bar.classList.add("indeterminate");
        bar.style.width = "";
        $("cuff").hidden = true;
      }
    }
    if (s.state === "result") renderResult(s.result, session);
    else clearResult();
    if (s.state !== "measuring") $("cuff").textContent = "";
    speakScreen();
  }

  function renderResult(r, session) {
    const t = KioskI18n.t;
    $("result-kind").textContent = t("kind_" + r.kind);
    $("result-value").textContent = r.value;
    $("result-unit").textContent = r.unit;
    $("result-pulse").hidden = typeof r.pulse_bpm !== "number";
    $("result-pulse").textContent =
      typeof r.pulse_bpm === "number" ? t("pulse", { value: r.pulse_bpm }) : "";
    $("advice").dataset.advice = r.advice;
    $("advice-title").textContent = t("advice_" + r.advice);
    $("advice-detail").textContent = t("advice_" + r.advice + "_detail");
    const ask = Boolean(r.question) && !answered.has(r.reading_id);
    $("question").hidden = !ask;
    $("question").dataset.question = r.question || "";
    $("question-text").textContent = r.question ? t("question_" + r.question) : "";
    $("answered").hidden = !answered.has(r.reading_id);
    $("yes").disabled = false;
    $("no").disabled = false;
    $("question").dataset.session = String(session);
  }

  // A hidden result is still in the page: the next patient must not find it there.
  function clearResult() {
    for (const id of ["result-kind", "result-value", "result-unit", "result-pulse", "advice-title",
                      "advice-detail", "question-text"]) {
      $(id).textContent = "";
    }
    $("advice").dataset.advice = "";
    $("question").hidden = true;
    $("answered").hidden = true;
  }

  // What the page says aloud for the current screen: the result (value, unit, advice) and its question.
  function speechText() {
    const s = screen;
    if (s.state !== "result") return null;
    const t = KioskI18n.t;
    const r = s.result;
    const unit = t("unit_" + r.unit);
    const vars = {
      kind: t("kind_" + r.kind),
      value: r.value,
      unit: unit.startsWith("unit_") ? r.unit : unit,
      advice: t("advice_" + r.advice),
      detail: t("advice_" + r.advice + "_detail"),
    };
    let text;
    if (r.kind === "blood_pressure" && r.value.includes("/")) {
      const [systolic, diastolic] = r.value.split("/");
      text = t("speak_blood_pressure", Object.assign(vars, { systolic, diastolic }));
    } else {
      text = t("speak_glucose", vars);
    }
    if (r.question && !answered.has(r.reading_id)) text += " " + t("question_" + r.question);
    return text;
  }

  // Speaks in the page's language with a voice for it; silent where the browser has none (it would
  // otherwise read Chinese with an English voice, or not at all).
  function speakScreen() {
    const text = speechText();
    const key = text === null ? null : KioskI18n.current() + "\u0000" + text;
    if (key === lastSpoken) return;
    lastSpoken = key;
    const synth = window.speechSynthesis;
    if (synth) synth.cancel();
    $("screen").dataset.speech = text || "";
    if (text === null) {
      $("screen").dataset.spoken = "";
      return;
    }
    const lang = KioskI18n.t("_speech_lang");
    const voices = synth ? synth.getVoices() : [];
    const norm = (l) => l.replace("_", "-").toLowerCase();
    const voice =
      voices.find((v) => norm(v.lang) === norm(lang)) ||
      voices.find((v) => norm(v.lang).split("-")[0] === norm(lang).split("-")[0]);
    if (!voice) {
      $("screen").dataset.spoken = "no-voice";
      return;
    }
    const u = new SpeechSynthesisUtterance(text);
    u.voice = voice;
    u.lang = voice.lang;
    u.rate = 0.85; // a little slower, for elderly listeners
    synth.speak(u);
    $("screen").dataset.spoken = "spoken";
  }

  async function post(path, body) {
    try {
      return await fetch(path, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (e) {
      return null;
    }
  }

  async function answer(yes) {
    const s = screen;
    if (s.state !== "result") return;
    const readingId = s.result.reading_id;
    $("yes").disabled = true;
    $("no").disabled = true;
    const r = await post("/api/answer", { session: s.session, reading_id: readingId, yes });
    if (r && r.ok) answered.add(readingId);
    // Refused (the session is over): the server's next screen replaces this one anyway.
    render();
  }

  function setScreen(next) {
    const before = sessionOf(screen);
    const after = sessionOf(next);
    screen = next;
    if (after === null || after !== before) {
      answered = new Set();
    }
    // The next patient starts in the default language.
    if (before !== null && after === null && KioskI18n.current() !== KioskI18n.defaultCode()) {
      KioskI18n.use(KioskI18n.defaultCode());
      return; // use() re-renders through onChange
    }
    render();
  }

  function connect() {
    const events = new EventSource("/events");
    events.addEventListener("screen", (e) => {
      $("offline").hidden = true;
      let next;
      try {
        next = JSON.parse(e.data);
      } catch (_) {
        next = { state: "idle" };
      }
      if (!STATES.includes(next.state)) next = { state: "idle" };
      setScreen(next);
    });
    events.addEventListener("error", () => {
      // Nothing of a patient stays on a screen the server no longer confirms.
      $("offline").hidden = false;
      setScreen({ state: "idle" });
    });
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("yes").addEventListener("click", () => answer(true));
    $("no").addEventListener("click", () => answer(false));
    $("done").addEventListener("click", async () => {
      const session = sessionOf(screen);
      if (session !== null) await post("/api/done", { session });
    });
    KioskI18n.onChange(() => {
      lastSpoken = null; // say it again in the new language
      render();
    });
    if (window.speechSynthesis) {
      // Voices load late in Chromium: speak once they are there.
      window.speechSynthesis.addEventListener("voiceschanged", () => {
        lastSpoken = null;
        speakScreen();
      });
    }
    await KioskI18n.init($("langs"));
    connect();
  });
})();
