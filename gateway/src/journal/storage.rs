//! The file-system seam: everything the journal does to the disk goes through [`Storage`], so that tests
//! can inject the failures a real SD card produces (a short write, `ENOSPC`, a failing `fdatasync`).
//!
//! [`OsStorage`] is the real thing: `0700` directory, `0600` files, `flock` for one writer,
//! `fallocate` for preallocated segments, `pwrite` + `fdatasync`.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the journal directory: the service user only.
pub(super) const DIR_MODE: u32 = 0o700;
/// Mode of every journal file: the service user only.
pub(super) const FILE_MODE: u32 = 0o600;

/// A segment file being written. Positional writes: a failed write leaves no file cursor to repair.
///
/// Shared (`&self`, `Sync`): the journal writer `fdatasync`s its group commit through its own handle
/// while the journal's lock is free for the uplink's reads and acks (see `Journal::begin_append`).
pub(super) trait SegmentWriter: Send + Sync + fmt::Debug {
    /// Writes all of `buf` at `offset` (or fails, possibly after writing a prefix).
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes (rolls back a failed write). Not synced.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves `len` bytes of disk for the file (best effort; `StorageFull` when the disk is full).
    fn preallocate(&self, len: u64) -> io::Result<()>;
}

/// A segment file opened for positioned reads of pending records' frames. Shared reads (`&self`): no
/// file cursor, so one handle serves any offset.
pub(super) trait SegmentReader: Send + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` if the file is shorter).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// The directory and file operations the journal needs.
pub(super) trait Storage: Send + Sync + fmt::Debug {
    /// Creates `dir` (and parents) with mode `0700`, or tightens an existing one to `0700`.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive, non-blocking lock on the directory; `WouldBlock` if another process has it.
    /// The lock lives as long as the returned guard.
    fn lock(&self, dir: &Path) -> io::Result<Box<dyn fmt::Debug + Send>>;
    /// The names of the entries of `dir` that are valid UTF-8.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading (tightening its mode to `0600` if it was wider); returns it and its length.
    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)>;
    /// Opens a segment for positioned reads. Its own file descriptor: reads see what the
    /// [`SegmentWriter`] of the same file wrote (one page cache), flushed or not.
    fn open_reader(&self, path: &Path) -> io::Result<Box<dyn SegmentReader>>;
    /// Cuts a file to `len` bytes and `fdatasync`s it.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Creates a new file (`O_EXCL`, mode `0600`) for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentWriter>>;
    /// Renames `from` to `to` (atomic within a directory).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Deletes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync`s a directory, making creations, renames and deletions in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct OsStorage;

/// Sets `mode` on `path` if its group/other bits are wider than `mode` allows.
fn tighten(path: &Path, meta: &fs::Metadata, mode: u32) -> io::Result<()> {
    let current = meta.permissions().mode() & 0o777;
    if current & !mode != 0 {
        tracing::warn!(path = %path.display(), mode = format_args!("{current:o}"), want = format_args!("{mode:o}"),
            "journal: tightening permissions (journal data is readable by the service user only)");
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

impl Storage for OsStorage {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        let meta = fs::metadata(dir)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "journal path is not a directory",
            ));
        }
        tighten(dir, &meta, DIR_MODE)
    }

    fn lock(&self, dir: &Path) -> io::Result<Box<dyn fmt::Debug + Send>> {
        let path = dir.join(super::LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)?;
        tighten(&path, &file.metadata()?, FILE_MODE)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(io::Error::from)?;
        Ok(Box::new(file))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        tighten(path, &meta, FILE_MODE)?;
        Ok((
            Box::new(BufReader::with_capacity(64 * 1024, file)),
            meta.len(),
        ))
    }

    fn open_reader(&self, path: &Path) -> io::Result<Box<dyn SegmentReader>> {
        Ok(Box::new(OsReader(File::open(path)?)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.sync_data()
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentWriter>> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)?;
        Ok(Box::new(OsSegment(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A segment file on the real file system.
#[derive(Debug)]
struct OsSegment(File);

impl SegmentWriter for OsSegment {
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn preallocate(&self, len: u64) -> io::Result<()> {
        // Mode 0: allocate and extend the size, so that later fdatasyncs need not persist a size change.
        rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len)
            .map_err(io::Error::from)
    }
}

/// A segment file opened for reading on the real file system.
#[derive(Debug)]
struct OsReader(File);

impl SegmentReader for OsReader {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
    }
}

/// Fault injection for tests: wraps [`OsStorage`] and fails chosen operations.
#[cfg(test)]
pub(super) mod faulty {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What to break next. Each fault fires once.
    #[derive(Debug, Default)]
    pub struct Faults {
        /// The next segment write writes this many bytes, then fails with `ENOSPC`.
        pub write_fails_after: Option<usize>,
        /// The next `fdatasync` of a segment fails with `EIO`.
        pub sync_fails: bool,
        /// The next `set_len` (rollback) fails with `EIO`.
        pub set_len_fails: bool,
        /// The next segment creation fails with `ENOSPC`.
        pub create_fails: bool,
        /// The next positioned read of a segment fails with `EIO`.
        pub read_fails: bool,
    }

    #[derive(Debug, Clone, Default)]
    pub struct FaultyStorage(pub Arc<Mutex<Faults>>);

    #[derive(Debug)]
    struct FaultySegment {
        inner: Box<dyn SegmentWriter>,
        faults: Arc<Mutex<Faults>>,
    }

    #[derive(Debug)]
    struct FaultyReader {
        inner: Box<dyn SegmentReader>,
        faults: Arc<Mutex<Faults>>,
    }

    impl SegmentReader for FaultyReader {
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if std::mem::take(&mut self.faults.lock().unwrap().read_fails) {
                return Err(io::Error::other("injected EIO on pread"));
            }
            self.inner.read_exact_at(offset, buf)
        }
    }

    fn enospc() -> io::Error {
        io::Error::from(io::ErrorKind::StorageFull)
    }

    impl Storage for FaultyStorage {
        fn create_dir(&self, dir: &Path) -> io::Result<()> {
            OsStorage.create_dir(dir)
        }
        fn lock(&self, dir: &Path) -> io::Result<Box<dyn fmt::Debug + Send>> {
            OsStorage.lock(dir)
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            OsStorage.list(dir)
        }
        fn open_read(&self, path: &Path) -> io::Result<(Box<dyn Read + Send>, u64)> {
            OsStorage.open_read(path)
        }
        fn open_reader(&self, path: &Path) -> io::Result<Box<dyn SegmentReader>> {
            Ok(Box::new(FaultyReader {
                inner: OsStorage.open_reader(path)?,
                faults: self.0.clone(),
            }))
        }
        fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
            OsStorage.truncate(path, len)
        }
        fn create(&self, path: &Path) -> io::Result<Box<dyn SegmentWriter>> {
            if std::mem::take(&mut self.0.lock().unwrap().create_fails) {
                return Err(enospc());
            }
            Ok(Box::new(FaultySegment {
                inner: OsStorage.create(path)?,
                faults: self.0.clone(),
            }))
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            OsStorage.rename(from, to)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            OsStorage.remove(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            OsStorage.sync_dir(dir)
        }
    }

    impl SegmentWriter for FaultySegment {
        fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            if let Some(n) = self.faults.lock().unwrap().write_fails_after.take() {
                self.inner.write_all_at(offset, &buf[..n.min(buf.len())])?;
                return Err(enospc());
            }
            self.inner.write_all_at(offset, buf)
        }
        fn sync_data(&self) -> io::Result<()> {
            if std::mem::take(&mut self.faults.lock().unwrap().sync_fails) {
                return Err(io::Error::other("injected EIO on fdatasync"));
            }
            self.inner.sync_data()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            if std::mem::take(&mut self.faults.lock().unwrap().set_len_fails) {
                return Err(io::Error::other("injected EIO on ftruncate"));
            }
            self.inner.set_len(len)
        }
        fn preallocate(&self, len: u64) -> io::Result<()> {
            self.inner.preallocate(len)
        }
    }
}
