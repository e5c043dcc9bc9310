//! End-to-end scenarios across the workspace live in `tests/tests/`.
