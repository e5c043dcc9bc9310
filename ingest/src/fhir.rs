//! FHIR R4 rendering of a stored reading (HL7 Personal Health Device IG; FIELD.md §3). Not written yet:
//! every reading answers "cannot be rendered".

/// The reading (its stored `phg.reading/1` JSON) as a FHIR Observation, if it can be rendered.
pub fn observation(_reading: &serde_json::Value) -> Option<serde_json::Value> {
    None
}
