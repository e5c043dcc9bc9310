//! The CRM-side ingest service.
//!
//! Nothing is implemented yet (see the issue tracker); the crate holds the workspace's final shape.
