// The staff page. The token is kept in sessionStorage (gone when the tab closes) and sent as a header
// on every call: never a cookie, so another site's page cannot act as staff.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "kiosk-staff-token";
  const REFRESH_MS = 2000;
  let view = null;
  let timer = null;

  const token = () => sessionStorage.getItem(KEY);

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      showLogin(true);
      throw new Error("unauthorized");
    }
    return r;
  }

  function showLogin(refused) {
    $("login").hidden = false;
    $("console").hidden = true;
    $("login-error").hidden = !refused;
    if (timer) clearInterval(timer);
    timer = null;
  }

  function showConsole() {
    $("login").hidden = true;
    $("console").hidden = false;
    refresh();
    if (!timer) timer = setInterval(refresh, REFRESH_MS);
  }

  async function refresh() {
    if (!token()) return showLogin(false);
    try {
      const r = await api("GET", "/api/staff");
      if (!r.ok) return;
      view = await r.json();
      render();
    } catch (_) {
      // unauthorized (handled) or the gateway is restarting: the next refresh tries again
    }
  }

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text === undefined || text === null ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  // A time from the API (RFC 3339, UTC) in the clinic's local time; the exact value stays in its title.
  function when(td, iso) {
    if (!iso) return;
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return;
    td.textContent = d.toLocaleString(KioskI18n.current() || undefined, { hour12: false });
    td.title = iso;
  }

  function heldReason(code) {
    const text = KioskI18n.t("held_" + code);
    return text === "held_" + code ? code : text;
  }

  function heldRow(h) {
    const t = KioskI18n.t;
    const tr = document.createElement("tr");
    tr.dataset.readingId = h.reading_id;
    cell(tr, h.device);
    cell(tr, t("staff_kind_" + h.kind));
    cell(tr, h.value + " " + h.unit);
    when(cell(tr, h.measured_utc || ""), h.measured_utc);
    when(cell(tr, h.received_utc), h.received_utc);
    cell(tr, heldReason(h.reason));
    const td = cell(tr, "");
    const patient = document.createElement("input");
    patient.className = "assign-patient";
    patient.placeholder = t("staff_patient");
    patient.autocomplete = "off";
    const assign = document.createElement("button");
    assign.type = "button";
    assign.className = "assign";
    assign.textContent = t("staff_assign");
    assign.addEventListener("click", () =>
      act("/api/assign", { reading_id: h.reading_id, patient: patient.value.trim() }),
    );
    const reason = document.createElement("input");
    reason.className = "discard-reason";
    reason.placeholder = t("staff_discard_reason");
    reason.autocomplete = "off";
    const discard = document.createElement("button");
    discard.type = "button";
    discard.className = "discard";
    discard.textContent = t("staff_discard");
    discard.addEventListener("click", () =>
      act("/api/discard", { reading_id: h.reading_id, reason: reason.value.trim() }),
    );
    td.append(patient, assign, reason, discard);
    return tr;
  }

  function render() {
    const t = KioskI18n.t;
    const s = view.session;
    $("no-session").hidden = Boolean(s);
    $("session").hidden = !s;
    if (s) {
      $("session-patient").textContent = s.patient;
      $("session-by").textContent = t("staff_by_" + s.by);
      $("session-started").textContent = s.started_utc;
      $("session-expires").textContent = s.expires_utc;
      when($("session-started"), s.started_utc);
      when($("session-expires"), s.expires_utc);
    }
    // Rows are kept by reading id, so a refresh never wipes what staff is typing into one.
    const body = $("held-rows");
    const existing = new Map([...body.children].map((tr) => [tr.dataset.readingId, tr]));
    const wanted = new Set(view.held.map((h) => h.reading_id));
    for (const [id, tr] of existing) if (!wanted.has(id)) tr.remove();
    for (const h of view.held) {
      const tr = existing.get(h.reading_id) || heldRow(h);
      body.appendChild(tr); // appends new rows, keeps the server's order for old ones
    }
    $("held").hidden = view.held.length === 0;
    $("no-held").hidden = view.held.length !== 0;
    const devices = $("device-rows");
    devices.replaceChildren();
    for (const d of view.devices) {
      const tr = document.createElement("tr");
      tr.dataset.device = d.device;
      cell(tr, d.device);
      // A device that has not sent a value yet: the kiosk cannot tell its kind.
      cell(tr, d.kind ? t("staff_kind_" + d.kind) : "");
      cell(tr, t(d.connected ? "staff_connected" : "staff_disconnected"));
      const battery = cell(tr, typeof d.battery_percent === "number"
        ? d.battery_percent + "%" + (d.battery_low ? " · " + t("staff_battery_low") : "") : "");
      battery.dataset.low = String(Boolean(d.battery_low));
      cell(tr, d.failure ? stageName(d.failure.stage) + ": " + d.failure.cause : "");
      devices.appendChild(tr);
    }
    const r = view.card_reader;
    if (r) {
      // The card reader board: without it (or with its reader broken) check-in is by staff entry only.
      const tr = document.createElement("tr");
      tr.id = "card-reader";
      tr.dataset.connected = String(r.connected);
      tr.dataset.readerOk = String(r.reader_ok);
      cell(tr, t("staff_card_reader"));
      cell(tr, "");
      cell(tr, t(r.connected && r.reader_ok !== false ? "staff_connected"
        : r.connected ? "staff_reader_fault" : "staff_disconnected"));
      cell(tr, "");
      cell(tr, r.failure ? t("staff_failure_" + r.failure) : "");
      devices.appendChild(tr);
    }
    $("journal-depth").textContent = String(view.journal_depth);
    $("broker").textContent = t(view.broker_connected ? "staff_broker_up" : "staff_broker_down");
    $("broker").dataset.up = String(view.broker_connected);
  }

  // A session stage in the page's language ("racp write" -> staff_stage_racp_write), or as the source
  // named it when the page has no text for it.
  function stageName(stage) {
    const key = "staff_stage_" + String(stage).replace(/[^a-z0-9]+/gi, "_");
    return KioskI18n.has(key) ? KioskI18n.t(key) : stage;
  }

  async function act(path, body) {
    const msg = $("message");
    try {
      const r = await api("POST", path, body);
      if (r.ok) {
        msg.textContent = KioskI18n.t("staff_done");
        msg.dataset.result = "ok";
      } else {
        let error = String(r.status);
        try {
          const body = await r.json();
          // A refusal with a code is said in the page's language; without one, in the server's words.
          const key = "staff_error_" + body.code;
          error = body.code && KioskI18n.has(key) ? KioskI18n.t(key) : body.error || error;
        } catch (_) {}
        msg.textContent = KioskI18n.t("staff_failed", { error });
        msg.dataset.result = "failed";
      }
    } catch (_) {
      return;
    }
    refresh();
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("token-save").addEventListener("click", () => {
      const v = $("token").value.trim();
      if (!v) return;
      sessionStorage.setItem(KEY, v);
      $("token").value = "";
      showConsole();
    });
    $("token").addEventListener("keydown", (e) => {
      if (e.key === "Enter") $("token-save").click();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showLogin(false);
    });
    $("checkin").addEventListener("click", () =>
      act("/api/checkin", { patient: $("checkin-patient").value.trim() }),
    );
    $("checkout").addEventListener("click", () => act("/api/checkout"));
    KioskI18n.onChange(() => {
      // Row texts are built in code: rebuild them in the new language.
      $("held-rows").replaceChildren();
      if (view) render();
    });
    await KioskI18n.init($("langs"));
    if (token()) showConsole();
    else showLogin(false);
  });
})();
