-- V1: the schema of ingest 0.1 as it was before versioned migrations (issue 14 item 8). `IF NOT EXISTS`
-- so that a database that version created (tables present, no refinery_schema_history) is adopted as V1.
-- Never edit an applied migration (refinery refuses a database whose history diverges): add V2, V3, ….
CREATE TABLE IF NOT EXISTS readings (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    gateway TEXT NOT NULL,
    kind TEXT NOT NULL,
    time_utc BIGINT NOT NULL,
    received_utc BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    instance TEXT NOT NULL,
    payload TEXT NOT NULL,
    eval_error TEXT
);
CREATE INDEX IF NOT EXISTS readings_by_patient ON readings (patient, time_utc);
CREATE TABLE IF NOT EXISTS patient_state (
    patient TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    next_deadline_utc BIGINT
);
CREATE TABLE IF NOT EXISTS patient_settings (
    patient TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    opened_utc BIGINT NOT NULL,
    updated_utc BIGINT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_ms BIGINT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_patient ON alerts (patient, opened_utc);
CREATE TABLE IF NOT EXISTS alert_events (
    id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL,
    action TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    notice TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    delivered_ms BIGINT,
    last_error TEXT,
    UNIQUE (event_id, sink)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, next_attempt_ms) WHERE delivered_ms IS NULL;
CREATE TABLE IF NOT EXISTS gateway_events (
    id TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    kind TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bad_messages (
    id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    error TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    payload TEXT NOT NULL
);
-- A database from before patient_state.next_deadline_utc.
ALTER TABLE patient_state ADD COLUMN IF NOT EXISTS next_deadline_utc BIGINT;
CREATE INDEX IF NOT EXISTS patient_state_deadline ON patient_state (next_deadline_utc);
