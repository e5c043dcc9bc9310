-- V3: the BP readings the rule engine keeps for its window rules get a row each (issue 15 item 1). Kept
-- inside the patient's state, days of history were rewritten with every batch that touched the patient:
-- most of what ingest wrote. `history_rev` names the rows a state goes with (a new random value at each
-- write; an instance reuses its cached engine only when both are unchanged). A state written before V3
-- (NULL revision) still holds its history; its next write moves it here.
ALTER TABLE patient_state ADD COLUMN history_rev BIGINT;
CREATE TABLE IF NOT EXISTS bp_history (
    patient TEXT NOT NULL,
    reading_id TEXT NOT NULL,
    time_utc BIGINT NOT NULL,
    -- The order among readings of equal time (ascending in the order the engine kept them).
    seq BIGINT NOT NULL,
    -- The engine's form of the entry (JSON).
    entry TEXT NOT NULL,
    PRIMARY KEY (patient, reading_id)
) WITHOUT ROWID;
