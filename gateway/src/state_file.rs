//! Small state files beside the journal (the CRM's configuration, the edge engine's state, paired devices),
//! each replaced whole: one way to write them, so each survives a crash or power cut as the old file or the
//! new one, never a mix.
use std::path::Path;

/// Replaces `path` with `bytes` so that a crash or power cut leaves either the old file or the new one,
/// whole: a temporary file in the same directory, written and `fsync`ed, renamed over `path`, and the
/// directory `fsync`ed so the rename itself is durable. Mode 0600: it holds pseudonymous patient ids.
///
/// # Errors
/// Any step failed; `path` is as it was (a stale `.tmp` beside it is overwritten next time).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}
