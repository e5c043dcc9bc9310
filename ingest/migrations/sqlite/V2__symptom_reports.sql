-- V2: the patients' answers to the kiosk's symptom question (phg.symptoms/1 on …/symptoms), stored beside
-- their reading. `IF NOT EXISTS`: a database the first symptom-aware ingest (before versioned migrations
-- met it) created already has the table.
CREATE TABLE IF NOT EXISTS symptom_reports (
    id TEXT PRIMARY KEY,
    reading_id TEXT NOT NULL,
    patient TEXT NOT NULL,
    gateway TEXT NOT NULL,
    symptoms TEXT NOT NULL,
    answered_utc BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    instance TEXT NOT NULL,
    payload TEXT NOT NULL,
    eval_error TEXT
);
CREATE INDEX IF NOT EXISTS symptom_reports_by_reading ON symptom_reports (reading_id, patient);
