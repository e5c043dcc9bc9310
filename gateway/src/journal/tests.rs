//! Behaviour tests of the journal: round trips, restarts, bounds, torn and corrupt files, injected I/O
//! failures, permissions, and a model-based property test.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::storage::faulty::{Faults, FaultyStorage};
use super::*;

const TOPIC: &str = "phg/v1/gw-1/readings";

fn cfg(root: &Path) -> JournalConfig {
    JournalConfig {
        dir: root.join("journal"),
        max_bytes: 1 << 20,
        max_records: 1000,
        segment_bytes: 64 * 1024,
    }
}

fn rec(device: &str, device_seq: u64, id: &str) -> NewRecord {
    NewRecord {
        device: device.into(),
        device_seq: Some(device_seq),
        reading_id: id.into(),
        topic: TOPIC.into(),
        payload: format!(r#"{{"schema":"reading/1","id":"{id}","mmHg":[120,80]}}"#).into_bytes(),
    }
}

fn open(cfg: &JournalConfig) -> (Journal, Recovery) {
    Journal::open(cfg.clone()).expect("open journal")
}

fn open_faulty(cfg: &JournalConfig) -> (Journal, Recovery, Arc<Mutex<Faults>>) {
    let storage = FaultyStorage::default();
    let faults = storage.0.clone();
    let (j, r) = Journal::open_with(cfg.clone(), Box::new(storage)).expect("open journal");
    (j, r, faults)
}

/// The segment files in the directory, in id order.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_segment_name)
                .is_some()
        })
        .collect();
    v.sort();
    v
}

fn ids(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.reading_id.as_str()).collect()
}

/// Every byte of every file in the directory (to prove "nothing written").
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn append_pending_ack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut j, rec0) = open(&cfg(tmp.path()));
    assert!(rec0.is_clean());
    assert_eq!((rec0.records, rec0.segments, rec0.next_seq), (0, 0, 1));

    let seqs = j
        .append(&[
            rec("cuff", 1, "a"),
            rec("cuff", 2, "b"),
            rec("meter", 7, "c"),
        ])
        .unwrap();
    assert_eq!(seqs, vec![1, 2, 3]);
    let seqs = j.append(&[rec("meter", 8, "d")]).unwrap();
    assert_eq!(seqs, vec![4]);
    assert_eq!(j.depth(), 4);
    assert!(j.pending_bytes() > 0);

    let all = j.pending(None, 100).unwrap();
    assert_eq!(ids(&all), ["a", "b", "c", "d"]);
    assert_eq!(
        all[2],
        Record {
            seq: 3,
            device: "meter".into(),
            device_seq: Some(7),
            reading_id: "c".into(),
            topic: TOPIC.into(),
            payload: rec("meter", 7, "c").payload,
        }
    );
    assert_eq!(ids(&j.pending(Some(1), 2).unwrap()), ["b", "c"]);
    assert_eq!(ids(&j.pending(Some(4), 10).unwrap()), Vec::<&str>::new());
    assert_eq!(j.pending(None, 0).unwrap(), vec![]);

    // Out of order acks (in-flight window), then the rest.
    j.ack(&[3, 1]).unwrap();
    assert_eq!(ids(&j.pending(None, 100).unwrap()), ["b", "d"]);
    j.ack(&[2, 4]).unwrap();
    assert_eq!(j.depth(), 0);
    assert_eq!(j.pending_bytes(), 0);
    assert_eq!(j.cursor("cuff"), Some(2));
    assert_eq!(j.cursor("meter"), Some(8));
    assert_eq!(j.cursor("nobody"), None);
    assert!(j.bytes_written() > 0);
    assert!(j.append(&[]).unwrap().is_empty());
}

#[test]
fn reopen_keeps_pending_and_forgets_acked() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    {
        let (mut j, _) = open(&c);
        j.append(&[
            rec("cuff", 1, "a"),
            rec("cuff", 2, "b"),
            rec("cuff", 3, "c"),
        ])
        .unwrap();
        j.append(&[rec("meter", 1, "d")]).unwrap();
        j.ack(&[2]).unwrap();
    }
    let (mut j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.records, 3);
    assert_eq!(r.next_seq, 5);
    assert_eq!(r.pending_bytes, j.pending_bytes());
    let p = j.pending(None, 10).unwrap();
    assert_eq!(ids(&p), ["a", "c", "d"]);
    assert_eq!(p.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3, 4]);
    assert_eq!(j.cursor("cuff"), Some(3));
    assert_eq!(j.cursor("meter"), Some(1));
    // Seqs are never reused.
    assert_eq!(j.append(&[rec("meter", 2, "e")]).unwrap(), vec![5]);
    j.ack(&[1, 3, 4]).unwrap();
    drop(j);

    let (j, r) = open(&c);
    assert!(r.is_clean());
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["e"]);
    // Only the fresh active segment and the one holding "e" remain.
    assert_eq!(segment_files(&c.dir).len(), 2);
    assert_eq!(j.segments(), 2);
}

#[test]
fn cursor_survives_segment_deletion_across_many_rolls() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 300,
        ..cfg(tmp.path())
    };
    let devices = ["cuff-1", "meter-1", "meter-2"];
    {
        let (mut j, _) = open(&c);
        for i in 0..150u64 {
            let d = devices[(i % 3) as usize];
            let seqs = j.append(&[rec(d, 1000 + i, &format!("r{i}"))]).unwrap();
            j.ack(&seqs).unwrap();
        }
        assert!(j.next_segment_id > 40, "rolled {} times", j.next_segment_id);
        // Every segment but the active one was deleted as soon as its records were acked.
        assert_eq!(segment_files(&c.dir).len(), 1);
        assert_eq!(j.depth(), 0);
    }
    let first = segment_path(&c.dir, 1);
    assert!(!first.exists());
    let (j, r) = open(&c);
    assert!(r.is_clean());
    assert_eq!(r.records, 0);
    assert_eq!(j.cursor("cuff-1"), Some(1147));
    assert_eq!(j.cursor("meter-1"), Some(1148));
    assert_eq!(j.cursor("meter-2"), Some(1149));
    assert_eq!(r.next_seq, 151);
    // And again, now that even the previous process's segments are gone.
    drop(j);
    let (j, _) = open(&c);
    assert_eq!(j.cursor("meter-2"), Some(1149));
    assert_eq!(segment_files(&c.dir).len(), 1);
}

#[test]
fn cursor_is_the_maximum_and_ignores_records_without_device_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut j, _) = open(&cfg(tmp.path()));
    j.append(&[rec("m", 5, "a"), rec("m", 3, "b")]).unwrap();
    j.append(&[
        NewRecord {
            device_seq: None,
            ..rec("m", 0, "c")
        },
        NewRecord {
            device_seq: None,
            ..rec("x", 0, "d")
        },
    ])
    .unwrap();
    assert_eq!(j.cursor("m"), Some(5));
    assert_eq!(j.cursor("x"), None);
}

#[test]
fn duplicate_reading_id_is_not_doubled() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    // Within one batch, and against what is pending.
    assert_eq!(
        j.append(&[rec("m", 1, "a"), rec("m", 1, "a"), rec("m", 2, "b")])
            .unwrap(),
        vec![1, 1, 2]
    );
    let written = j.bytes_written();
    assert_eq!(
        j.append(&[rec("m", 2, "b"), rec("m", 1, "a")]).unwrap(),
        vec![2, 1]
    );
    assert_eq!(
        j.bytes_written(),
        written,
        "an all-duplicate batch writes nothing"
    );
    assert_eq!(
        j.append(&[rec("m", 2, "b"), rec("m", 3, "c")]).unwrap(),
        vec![2, 3]
    );
    assert_eq!(j.depth(), 3);
    drop(j);

    // Across a restart.
    let (mut j, _) = open(&c);
    assert_eq!(j.append(&[rec("m", 1, "a")]).unwrap(), vec![1]);
    assert_eq!(j.depth(), 3);
    // Once delivered, a re-download is a new record (the CRM upserts on the id).
    j.ack(&[1]).unwrap();
    assert_eq!(j.append(&[rec("m", 1, "a")]).unwrap(), vec![4]);
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["b", "c", "a"]);
}

#[test]
fn full_bound_rejects_without_writing_then_accepts_after_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        max_records: 3,
        ..cfg(tmp.path())
    };
    let (mut j, _) = open(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();

    let before = snapshot(&c.dir);
    let written = j.bytes_written();
    // Two new records, one slot: the whole batch fails.
    let err = j.append(&[rec("m", 3, "c"), rec("m", 4, "d")]).unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::Full {
                pending_records: 2,
                max_records: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_full());
    assert_eq!(snapshot(&c.dir), before, "nothing written");
    assert_eq!(j.bytes_written(), written);
    assert_eq!(j.depth(), 2);
    assert_eq!(
        j.cursor("m"),
        Some(2),
        "the device must keep records 3 and 4"
    );
    // A duplicate of a pending record still gets its seq: it takes no room.
    assert_eq!(
        j.append(&[rec("m", 1, "a"), rec("m", 3, "c")]).unwrap(),
        vec![1, 3]
    );
    assert!(j.append(&[rec("m", 4, "d")]).unwrap_err().is_full());

    j.ack(&[1]).unwrap();
    assert_eq!(j.append(&[rec("m", 4, "d")]).unwrap(), vec![4]);
    assert_eq!(j.cursor("m"), Some(4));

    // The byte bound, the same way.
    let tmp = tempfile::tempdir().unwrap();
    let one = frame::append_frame_len("m", "a", TOPIC, &rec("m", 1, "a").payload, true) as u64;
    let c = JournalConfig {
        max_bytes: 2 * one,
        ..cfg(tmp.path())
    };
    let (mut j, _) = open(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    assert_eq!(j.pending_bytes(), 2 * one);
    let err = j.append(&[rec("m", 3, "c")]).unwrap_err();
    assert!(
        matches!(err, JournalError::Full { max_bytes, .. } if max_bytes == 2 * one),
        "{err:?}"
    );
    j.ack(&[2]).unwrap();
    j.append(&[rec("m", 3, "c")]).unwrap();
}

/// When readings no longer fit, the notice that says so still does — into a bounded reserve.
#[test]
fn a_full_journal_still_takes_its_notice_within_the_reserve() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        max_records: 2,
        ..cfg(tmp.path())
    };
    let (mut j, _) = open(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    assert!(j.append(&[rec("m", 3, "c")]).unwrap_err().is_full());
    let notice = NewRecord {
        device_seq: None,
        ..rec("m", 0, "journal-full:m")
    };
    assert_eq!(
        j.append_notice(std::slice::from_ref(&notice)).unwrap(),
        vec![3]
    );
    assert_eq!(j.cursor("m"), Some(2), "a notice never advances the cursor");
    let many: Vec<NewRecord> = (0..NOTICE_RESERVE_RECORDS)
        .map(|i| NewRecord {
            device_seq: None,
            ..rec("m", 0, &format!("n{i}"))
        })
        .collect();
    assert!(
        j.append_notice(&many).unwrap_err().is_full(),
        "the reserve is bounded"
    );
}

#[test]
fn invalid_records_and_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    let before = j.bytes_written();
    for (bad, why) in [
        (
            NewRecord {
                reading_id: String::new(),
                ..rec("m", 1, "x")
            },
            "empty reading_id",
        ),
        (
            NewRecord {
                device: String::new(),
                ..rec("m", 1, "x")
            },
            "empty device",
        ),
        (
            NewRecord {
                topic: String::new(),
                ..rec("m", 1, "x")
            },
            "empty topic",
        ),
    ] {
        let err = j.append(&[rec("m", 1, "ok"), bad]).unwrap_err();
        assert!(
            matches!(err, JournalError::InvalidRecord { index: 1, reason } if reason == why),
            "{err:?}"
        );
    }
    let huge = NewRecord {
        payload: vec![0; 2 << 20],
        ..rec("m", 1, "big")
    };
    assert!(matches!(
        j.append(&[huge]).unwrap_err(),
        JournalError::RecordTooLarge { index: 0, .. }
    ));
    assert_eq!(j.bytes_written(), before);
    assert_eq!(j.depth(), 0);

    for bad in [
        JournalConfig {
            max_bytes: 0,
            ..c.clone()
        },
        JournalConfig {
            max_records: 0,
            ..c.clone()
        },
        JournalConfig {
            max_records: MAX_RECORDS_LIMIT + 1,
            ..c.clone()
        },
        JournalConfig {
            segment_bytes: 0,
            ..c.clone()
        },
        JournalConfig {
            segment_bytes: MAX_SEGMENT_BYTES + 1,
            ..c.clone()
        },
    ] {
        assert!(matches!(
            Journal::open(bad),
            Err(JournalError::InvalidConfig { .. })
        ));
    }
}

#[test]
fn ack_refuses_never_issued_seqs_and_ignores_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut j, _) = open(&cfg(tmp.path()));
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    for bad in [0, 3, u64::MAX] {
        let err = j.ack(&[1, bad]).unwrap_err();
        assert!(
            matches!(err, JournalError::UnknownSeq { seq, next_seq: 3 } if seq == bad),
            "{err:?}"
        );
    }
    assert_eq!(j.depth(), 2, "a refused ack acks nothing");
    j.ack(&[1, 1]).unwrap();
    let written = j.bytes_written();
    j.ack(&[1]).unwrap();
    assert_eq!(
        j.bytes_written(),
        written,
        "a repeated PUBACK writes nothing"
    );
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["b"]);
}

/// Appends `n` single-record batches and returns where the last frame starts and ends in the active
/// segment.
fn append_singles(j: &mut Journal, n: u64) -> (PathBuf, u64, u64) {
    let mut start = 0;
    for i in 0..n {
        start = j.active_segment().1;
        j.append(&[rec("m", i + 1, &format!("r{i}"))]).unwrap();
    }
    let (path, end) = j.active_segment();
    (path, start, end)
}

#[test]
fn torn_final_record_is_cut_off_at_every_offset() {
    let probe = tempfile::tempdir().unwrap();
    let (mut j, _) = open(&cfg(probe.path()));
    let (_, start, end) = append_singles(&mut j, 5);
    let frame_len = end - start;
    drop(j);

    let mut cuts: Vec<u64> = vec![
        1,
        2,
        3,
        4,
        5,
        7,
        8,
        9,
        10,
        frame_len / 2,
        frame_len - 2,
        frame_len - 1,
    ];
    cuts.dedup();
    for cut in cuts {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        let (mut j, _) = open(&c);
        let (path, start, _) = append_singles(&mut j, 5);
        drop(j);
        // The power went while the last frame was being written: only `cut` of its bytes reached the disk.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(start + cut)
            .unwrap();

        let (mut j, r) = open(&c);
        assert_eq!(r.records, 4, "cut {cut}: every complete record is kept");
        assert!(r.torn_bytes > 0 && r.torn_bytes <= cut, "cut {cut}: {r:?}");
        assert!(
            !r.has_corruption(),
            "cut {cut}: a torn tail is not corruption: {r:?}"
        );
        assert!(
            matches!(r.damage.as_slice(), [Damage { kind: DamageKind::Torn { .. }, offset, .. }] if *offset == start)
        );
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            start,
            "cut {cut}: truncated at the frame start"
        );
        assert_eq!(ids(&j.pending(None, 10).unwrap()), ["r0", "r1", "r2", "r3"]);
        assert_eq!(j.cursor("m"), Some(4), "the torn record was never accepted");

        // The gateway downloads r4 again; it is accepted this time, and survives another restart.
        assert_eq!(j.append(&[rec("m", 5, "r4")]).unwrap(), vec![5]);
        drop(j);
        let (j, r) = open(&c);
        assert!(r.is_clean(), "cut {cut}: {r:?}");
        assert_eq!(
            ids(&j.pending(None, 10).unwrap()),
            ["r0", "r1", "r2", "r3", "r4"]
        );
        assert_eq!(j.cursor("m"), Some(5));
    }
}

#[test]
fn torn_final_record_inside_preallocated_space_is_cut_off() {
    // In a preallocated segment a torn write leaves the frame's tail as zeros rather than a short file.
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    let (path, start, end) = append_singles(&mut j, 3);
    drop(j);
    let mut bytes = fs::read(&path).unwrap();
    let mid = usize::try_from(start + (end - start) / 2).unwrap();
    bytes[mid..usize::try_from(end).unwrap()].fill(0);
    fs::write(&path, &bytes).unwrap();

    let (j, r) = open(&c);
    assert_eq!(r.records, 2);
    assert!(r.torn_bytes > 0 && !r.has_corruption(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["r0", "r1"]);
}

#[test]
fn garbage_after_the_data_is_reported_not_panicking() {
    let huge_len = [0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4, 1, 0, 0];
    let bad_crc = {
        let mut f = Vec::new();
        frame::encode_append(&mut f, 99, "m", None, "zz", TOPIC, b"p").unwrap();
        f[5] ^= 0x40; // CRC byte
        f.extend_from_slice(b"more bytes after it");
        f
    };
    let patterns: Vec<(&str, Vec<u8>, bool)> = vec![
        ("three bytes", vec![0xde, 0xad, 0xbe], false),
        (
            "random block",
            (0..200u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            false,
        ),
        ("length past the end", huge_len.to_vec(), false),
        ("bad CRC with data after it", bad_crc, true),
        (
            "zero length then data",
            [&[0u8; 8][..], b"x"].concat(),
            true,
        ),
    ];
    for (what, garbage, corrupt) in patterns {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        let (mut j, _) = open(&c);
        let (path, _, end) = append_singles(&mut j, 3);
        drop(j);
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &garbage, end).unwrap();
        drop(file);

        let (mut j, r) = open(&c);
        assert_eq!(r.records, 3, "{what}: {r:?}");
        assert!(!r.is_clean(), "{what}: reported");
        assert_eq!(r.corrupt_frames > 0, corrupt, "{what}: {r:?}");
        assert_eq!(r.torn_bytes > 0, !corrupt, "{what}: {r:?}");
        assert_eq!(j.append(&[rec("m", 4, "r3")]).unwrap(), vec![4]);
        drop(j);
        let (j, r) = open(&c);
        assert_eq!(
            ids(&j.pending(None, 10).unwrap()),
            ["r0", "r1", "r2", "r3"],
            "{what}"
        );
        // A corrupt segment stays (evidence) and is reported again; a torn tail was cut off for good.
        assert_eq!(r.corrupt_frames > 0, corrupt, "{what}: {r:?}");
        assert_eq!(r.torn_bytes, 0, "{what}: {r:?}");
    }
}

#[test]
fn garbage_at_the_end_of_a_preallocated_file_is_corruption() {
    // Bytes after the zero tail: the data end is a zero "frame" followed by non-zero bytes.
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    let (path, _, _) = append_singles(&mut j, 2);
    drop(j);
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, b"\x01\x02\x03").unwrap();
    drop(f);
    let (j, r) = open(&c);
    assert_eq!(r.records, 2);
    assert_eq!(r.corrupt_frames, 1, "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["r0", "r1"]);
}

#[test]
fn corrupt_frame_in_an_older_segment_keeps_the_prefix_and_counts_the_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 600,
        ..cfg(tmp.path())
    };
    let (mut j, _) = open(&c);
    for i in 0..20u64 {
        j.append(&[rec("m", i + 1, &format!("r{i}"))]).unwrap();
    }
    let seg = segment_path(&c.dir, j.active.id - 2);
    let in_seg: Vec<u64> = j
        .pending
        .iter_after(None)
        .filter(|p| p.segment == j.active.id - 2)
        .map(|p| p.seq)
        .collect();
    assert!(in_seg.len() >= 3, "{in_seg:?}");
    drop(j);

    // Flip one payload byte of the second record frame in that segment.
    let mut bytes = fs::read(&seg).unwrap();
    let mut off = 0usize;
    let mut starts = Vec::new();
    loop {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        starts.push(off);
        off += frame::HEADER_LEN + len;
        if off + 4 > bytes.len() {
            break;
        }
    }
    // starts[0] is the checkpoint; starts[2] is the second Append.
    bytes[starts[2] + 20] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();

    let (j, r) = open(&c);
    assert_eq!(r.corrupt_frames, 1, "{r:?}");
    assert!(r.unreadable_bytes > 0);
    assert!(r.has_corruption());
    // The first record of the segment is kept; the rest of it is lost, and the later checkpoint knows.
    let lost = in_seg.len() as u64 - 1;
    assert_eq!(r.missing_records, lost, "{r:?}");
    assert_eq!(r.records, 20 - lost);
    assert!(
        j.pending(None, 100)
            .unwrap()
            .iter()
            .any(|p| p.seq == in_seg[0])
    );
    assert!(
        !j.pending(None, 100)
            .unwrap()
            .iter()
            .any(|p| p.seq == in_seg[1])
    );
}

#[test]
fn undecodable_frame_is_skipped_and_reading_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    let (path, _, end) = append_singles(&mut j, 2);
    drop(j);
    // A CRC-valid frame of an unknown kind, then a valid Append after it.
    let mut extra = Vec::new();
    let body = [42u8, 1, 2, 3];
    extra.extend_from_slice(&(body.len() as u32).to_le_bytes());
    extra.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    extra.extend_from_slice(&body);
    frame::encode_append(&mut extra, 3, "m", Some(3), "r2", TOPIC, b"{}").unwrap();
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &extra, end).unwrap();
    drop(file);

    let (j, r) = open(&c);
    assert_eq!(r.undecodable_frames, 1, "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["r0", "r1", "r2"]);
    assert_eq!(j.cursor("m"), Some(3));
}

#[test]
fn a_newer_format_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    fs::create_dir_all(&c.dir).unwrap();
    let body = [frame::KIND_CHECKPOINT, frame::FORMAT_VERSION + 1, 0, 0];
    let mut f = Vec::new();
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    f.extend_from_slice(&body);
    fs::write(segment_path(&c.dir, 1), &f).unwrap();
    let err = Journal::open(c.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::UnsupportedFormat {
                version: 2,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        fs::read(segment_path(&c.dir, 1)).unwrap(),
        f,
        "left as it was"
    );
    assert_eq!(segment_files(&c.dir).len(), 1);
}

#[test]
fn directory_and_files_are_readable_by_the_service_user_only() {
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    j.append(&[rec("m", 1, "a")]).unwrap();
    assert_eq!(mode(&c.dir), 0o700);
    assert_eq!(mode(&c.dir.join(LOCK_FILE)), 0o600);
    let segs = segment_files(&c.dir);
    assert!(!segs.is_empty());
    for s in &segs {
        assert_eq!(mode(s), 0o600, "{}", s.display());
    }
    drop(j);

    // Found wider (an admin's chmod, a restored backup): tightened on open.
    fs::set_permissions(&c.dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&segs[0], fs::Permissions::from_mode(0o644)).unwrap();
    let (_j, _) = open(&c);
    assert_eq!(mode(&c.dir), 0o700);
    assert_eq!(mode(&segs[0]), 0o600);
    for s in segment_files(&c.dir) {
        assert_eq!(mode(&s), 0o600, "{}", s.display());
    }

    // A directory created with its parents: 0700 too.
    let deep = JournalConfig {
        dir: tmp.path().join("a/b/journal"),
        ..c.clone()
    };
    let (_j2, _) = open(&deep);
    assert_eq!(mode(&deep.dir), 0o700);
}

#[test]
fn a_second_writer_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (j, _) = open(&c);
    let err = Journal::open(c.clone()).unwrap_err();
    assert!(matches!(err, JournalError::Locked { .. }), "{err:?}");
    drop(j);
    let (_j, r) = open(&c);
    assert!(r.is_clean());
}

#[test]
fn failed_write_is_cut_off_and_the_journal_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a")]).unwrap();
    let (path, end) = j.active_segment();

    // ENOSPC after part of the batch reached the file.
    faults.lock().unwrap().write_fails_after = Some(30);
    let err = j.append(&[rec("m", 2, "b"), rec("m", 3, "c")]).unwrap_err();
    assert!(err.is_full(), "{err:?}");
    assert!(!j.is_poisoned());
    assert_eq!(j.depth(), 1);
    assert_eq!(
        j.cursor("m"),
        Some(1),
        "nothing of the failed batch is accepted"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        end,
        "the partial write was cut off"
    );

    // The retry gets the same seqs, and a restart sees exactly what was accepted.
    assert_eq!(
        j.append(&[rec("m", 2, "b"), rec("m", 3, "c")]).unwrap(),
        vec![2, 3]
    );
    drop(j);
    let (j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a", "b", "c"]);
}

/// `append` is `begin_append`, the sync, `finish_append`: this covers a failed sync of the writer's split
/// append too.
#[test]
fn failed_fdatasync_poisons_and_a_reopen_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a")]).unwrap();

    faults.lock().unwrap().sync_fails = true;
    let err = j.append(&[rec("m", 2, "b")]).unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::Io {
                op: "fdatasync",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(j.is_poisoned());
    assert_eq!(j.cursor("m"), Some(1), "not accepted");
    assert!(matches!(
        j.append(&[rec("m", 3, "c")]),
        Err(JournalError::Poisoned { .. })
    ));
    assert!(matches!(j.ack(&[1]), Err(JournalError::Poisoned { .. })));
    assert_eq!(
        ids(&j.pending(None, 10).unwrap()),
        ["a"],
        "reads keep working"
    );
    drop(j);

    // The page may or may not have reached the disk; either way, re-appending does not double it.
    let (mut j, _) = open(&c);
    assert_eq!(j.append(&[rec("m", 2, "b")]).unwrap(), vec![2]);
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a", "b"]);
}

/// The writer thread's commit: frames written under the lock, `fdatasync` outside it, accepted under it
/// again. Between the halves a reader sees nothing of the batch, acks go on, and no other append starts.
#[test]
fn an_append_in_flight_is_invisible_until_finished_and_acks_go_on_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    let hour = Duration::from_secs(3600);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    j.ack_unsynced(&[1]).unwrap();

    let batch = [rec("m", 3, "c"), rec("m", 4, "d"), rec("m", 2, "b")];
    let written = j.begin_append(&batch).unwrap();
    // Written, not accepted: invisible to readers, the cursor and last_seq where they were.
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["b"]);
    assert_eq!(j.last_seq(), 2);
    assert_eq!(j.cursor("m"), Some(2));
    assert_eq!(j.depth(), 1);
    // One append at a time: seqs become pending in order.
    assert!(matches!(
        j.append_notice(&[rec("m", 9, "notice")]),
        Err(JournalError::Busy)
    ));
    // The uplink's acks do not wait: this one lands after the frames, so the fsync may miss it.
    j.ack_unsynced(&[2]).unwrap();

    let synced = written.sync();
    assert_eq!(
        j.finish_append(&batch, written, synced).unwrap(),
        vec![3, 4, 2]
    );
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["c", "d"]);
    assert_eq!((j.last_seq(), j.cursor("m")), (4, Some(4)));
    assert!(
        j.acks_due(hour).is_some(),
        "an ack written while the fsync ran stays due for its own sync"
    );

    // With no ack after its frames, the append's fsync carries the acks written before (one fsync).
    j.sync().unwrap();
    j.ack_unsynced(&[3]).unwrap();
    let before = j.fsyncs();
    let batch = [rec("m", 5, "e")];
    let written = j.begin_append(&batch).unwrap();
    let synced = written.sync();
    assert_eq!(j.finish_append(&batch, written, synced).unwrap(), vec![5]);
    assert_eq!(j.fsyncs(), before + 1);
    assert!(!j.has_unsynced_acks());
    assert_eq!(j.append_notice(&[rec("m", 9, "notice")]).unwrap(), vec![6]);
    drop(j);

    let (j, _) = open(&c);
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["d", "e", "notice"]);
}

#[test]
fn failed_cut_off_poisons() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a")]).unwrap();
    {
        let mut f = faults.lock().unwrap();
        f.write_fails_after = Some(12);
        f.set_len_fails = true;
    }
    assert!(j.append(&[rec("m", 2, "b")]).is_err());
    assert!(j.is_poisoned());
    drop(j);
    // The 12 bytes left behind are a torn tail to the next open (counted up to the last non-zero byte).
    let (j, r) = open(&c);
    assert!(r.torn_bytes > 0 && r.torn_bytes <= 12, "{r:?}");
    assert!(!r.has_corruption(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a"]);
}

#[test]
fn failed_segment_creation_leaves_the_journal_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 300,
        ..cfg(tmp.path())
    };
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    faults.lock().unwrap().create_fails = true;
    let err = j.append(&[rec("m", 3, "c")]).unwrap_err();
    assert!(err.is_full(), "{err:?}");
    assert!(!j.is_poisoned());
    // Acks still get out (they never need a new segment).
    j.ack(&[1]).unwrap();
    assert_eq!(j.append(&[rec("m", 3, "c")]).unwrap(), vec![3]);
    drop(j);
    assert!(
        fs::read_dir(&c.dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
    let (j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["b", "c"]);
}

#[test]
fn half_made_segments_and_foreign_files_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    {
        let (mut j, _) = open(&c);
        j.append(&[rec("m", 1, "a")]).unwrap();
    }
    fs::write(
        c.dir.join("00000000000000000099.log.tmp"),
        b"half a checkpoint",
    )
    .unwrap();
    fs::write(c.dir.join("notes.txt"), b"hello").unwrap();
    fs::write(c.dir.join("123.log"), b"not twenty digits").unwrap();
    let (j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a"]);
    assert!(!c.dir.join("00000000000000000099.log.tmp").exists());
    assert!(c.dir.join("notes.txt").exists());
}

/// Payloads of every byte value and many lengths, ids of both kinds, with and without device_seq.
fn varied(i: u64) -> NewRecord {
    NewRecord {
        device: format!("dev-{}", i % 3),
        device_seq: (!i.is_multiple_of(4)).then_some(i),
        reading_id: if i.is_multiple_of(2) {
            format!("{i:08x}-9cc1-5407-9253-b99b9ffbffec")
        } else {
            format!("id-{i}")
        },
        topic: format!("{TOPIC}/{}", i % 5),
        payload: (0..(i * 37 % 700)).map(|b| (b * 31 + i) as u8).collect(),
    }
}

fn as_record(seq: u64, r: &NewRecord) -> Record {
    Record {
        seq,
        device: r.device.clone(),
        device_seq: r.device_seq,
        reading_id: r.reading_id.clone(),
        topic: r.topic.clone(),
        payload: r.payload.clone(),
    }
}

#[test]
fn records_read_back_byte_exact_across_rolls_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 2000,
        ..cfg(tmp.path())
    };
    let records: Vec<NewRecord> = (0..120).map(varied).collect();
    let mut want = Vec::new();
    let (mut j, _) = open(&c);
    let mut i = 0;
    // Batches of 1..=5 records: frames at every kind of offset, and batches that roll the segment.
    for size in (1..=5).cycle() {
        if i >= records.len() {
            break;
        }
        let batch = &records[i..(i + size).min(records.len())];
        let seqs = j.append(batch).unwrap();
        for (seq, r) in seqs.iter().zip(batch) {
            want.push(as_record(*seq, r));
        }
        // Read straight back from the active segment, before anything else happens.
        let got = j.pending(Some(seqs[0] - 1), batch.len()).unwrap();
        assert_eq!(got, want[want.len() - batch.len()..]);
        i += size;
    }
    assert!(
        j.segments() > MAX_OPEN_READERS + 2,
        "rolled: {} segments",
        j.segments()
    );
    assert_eq!(j.pending(None, usize::MAX).unwrap(), want);
    // Reading every segment kept no more than the bound of read handles open.
    assert_eq!(j.readers.lock().unwrap().len(), MAX_OPEN_READERS);
    // Ack every third record: the rest still read back exactly (and segments get deleted).
    let acked: Vec<u64> = want.iter().map(|r| r.seq).filter(|s| s % 3 == 0).collect();
    j.ack(&acked).unwrap();
    want.retain(|r| r.seq % 3 != 0);
    assert_eq!(j.pending(None, usize::MAX).unwrap(), want);
    // Acking everything in the oldest segments deletes them, and closes their read handles.
    let oldest: Vec<u64> = want.iter().take(20).map(|r| r.seq).collect();
    let segments_before = j.segments();
    j.ack(&oldest).unwrap();
    want.drain(..20);
    assert!(j.segments() < segments_before);
    assert!(
        j.readers
            .lock()
            .unwrap()
            .keys()
            .all(|id| j.segments.contains_key(id))
    );
    assert_eq!(j.pending(None, usize::MAX).unwrap(), want);
    let bytes = j.pending_bytes();
    drop(j);

    let (j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.pending_bytes, bytes);
    assert_eq!(j.pending_bytes(), bytes);
    assert_eq!(j.pending(None, usize::MAX).unwrap(), want);
    // Paging agrees with the whole list.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = j.pending(after, 7).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        paged.extend(page);
    }
    assert_eq!(paged, want);
    assert_eq!(segment_files(&c.dir).len(), j.segments());
}

#[test]
fn a_batch_larger_than_one_read_span_reads_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    // 12 frames of ~60 KB back to back: more than READ_SPAN, so `pending` splits them into runs.
    let batch: Vec<NewRecord> = (0..12u64)
        .map(|i| NewRecord {
            payload: (0..60_000u64).map(|b| (b ^ i) as u8).collect(),
            ..rec("m", i + 1, &format!("big-{i}"))
        })
        .collect();
    let seqs = j.append(&batch).unwrap();
    let want: Vec<Record> = seqs
        .iter()
        .zip(&batch)
        .map(|(&s, r)| as_record(s, r))
        .collect();
    assert!(j.pending_bytes() > 2 * READ_SPAN);
    assert_eq!(j.pending(None, 100).unwrap(), want);
    assert_eq!(j.pending(Some(5), 3).unwrap(), want[5..8]);
    // With holes (acked records) in the middle.
    j.ack(&[3, 4, 9]).unwrap();
    let holed: Vec<Record> = want
        .iter()
        .filter(|r| ![3, 4, 9].contains(&r.seq))
        .cloned()
        .collect();
    assert_eq!(j.pending(None, 100).unwrap(), holed);
}

#[test]
fn a_pending_record_damaged_on_disk_is_an_error_never_a_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _) = open(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b"), rec("m", 3, "c")])
        .unwrap();
    let slot = *j.pending.iter_after(Some(1)).next().unwrap();
    assert_eq!(slot.seq, 2);
    let path = segment_path(&c.dir, slot.segment);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = slot.offset + u64::from(slot.len) - 3; // a payload byte
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x20], at).unwrap();

    for (after, limit) in [(None, 10), (Some(1), 1), (None, usize::MAX)] {
        let err = j.pending(after, limit).unwrap_err();
        match &err {
            JournalError::DamagedRecord {
                segment,
                offset,
                seq,
                reason,
            } => {
                assert_eq!((segment, *offset, *seq), (&path, slot.offset, 2));
                assert!(reason.contains("CRC"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(&slot.offset.to_string()),
            "{msg}"
        );
    }
    // What does not include it still reads.
    assert_eq!(ids(&j.pending(None, 1).unwrap()), ["a"]);
    assert_eq!(ids(&j.pending(Some(2), 10).unwrap()), ["c"]);

    // Another record's valid frame where seq 2 should be: caught too.
    let mut other = Vec::new();
    frame::encode_append(
        &mut other,
        7,
        "m",
        Some(2),
        "b",
        TOPIC,
        &rec("m", 2, "b").payload,
    )
    .unwrap();
    assert_eq!(other.len() as u64, u64::from(slot.len));
    std::os::unix::fs::FileExt::write_all_at(&file, &other, slot.offset).unwrap();
    let err = j.pending(Some(1), 1).unwrap_err();
    assert!(
        matches!(&err, JournalError::DamagedRecord { seq: 2, reason, .. } if reason.contains("seq 7")),
        "{err:?}"
    );

    // The file cut short under the record: an I/O error naming the segment and the offset.
    file.set_len(slot.offset + 5).unwrap();
    let err = j.pending(None, 10).unwrap_err();
    match &err {
        JournalError::Io {
            path: p, source, ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
            assert!(
                source
                    .to_string()
                    .contains(&format!("offset {}", slot.offset)),
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(j);

    // A reopen reports the damage and opens with what is readable.
    let (j, r) = open(&c);
    assert!(!r.is_clean(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a"]);
}

#[test]
fn a_failed_read_is_an_io_error_and_the_next_read_works() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b")]).unwrap();
    // Both frames are read with one pread; when that fails, they are read again one by one.
    faults.lock().unwrap().read_fails = true;
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a", "b"]);
    // A single record has no second chance within the call.
    faults.lock().unwrap().read_fails = true;
    let err = j.pending(Some(1), 10).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::Io {
                op: "read pending records",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("offset"), "{err}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["a", "b"]);
}

#[test]
fn dedup_by_uuid_and_by_other_ids_survives_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    let uuid = "20178b84-9cc1-5407-9253-b99b9ffbffec";
    // The same UUID spelled otherwise is another string: never folded into the canonical one.
    let upper = uuid.to_uppercase();
    let other = "journal-full:dev:123";
    {
        let (mut j, _) = open(&c);
        assert_eq!(
            j.append(&[rec("m", 1, uuid), rec("m", 2, other), rec("m", 3, &upper)])
                .unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            j.append(&[rec("m", 1, uuid), rec("m", 2, other)]).unwrap(),
            vec![1, 2]
        );
    }
    let (mut j, _) = open(&c);
    assert_eq!(
        j.append(&[rec("m", 2, other), rec("m", 1, uuid), rec("m", 3, &upper)])
            .unwrap(),
        vec![2, 1, 3]
    );
    assert_eq!(j.depth(), 3);
    // Acked, an id may come again as a new record; still pending ones still dedup.
    j.ack(&[1, 2]).unwrap();
    assert_eq!(
        j.append(&[rec("m", 1, uuid), rec("m", 2, other), rec("m", 3, &upper)])
            .unwrap(),
        vec![4, 5, 3]
    );
    drop(j);
    let (mut j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        j.append(&[rec("m", 1, uuid), rec("m", 2, other), rec("m", 3, &upper)])
            .unwrap(),
        vec![4, 5, 3]
    );
    assert_eq!(
        ids(&j.pending(None, 10).unwrap()),
        [upper.as_str(), uuid, other]
    );
}

// ---------------------------------------------------------------------------------------------------
// Model-based property test
// ---------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Records as (device 0..3, reading id 0..24, payload length).
    Append(Vec<(u8, u8, u8)>),
    /// Ack the pending records at these positions (and a stale seq, to be ignored).
    Ack(Vec<proptest::sample::Index>),
    /// Drop the journal and open it again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec((0u8..3, 0u8..24, 0u8..40), 1..6).prop_map(Op::Append),
        3 => proptest::collection::vec(any::<proptest::sample::Index>(), 1..5).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

fn model_record(device: u8, id: u8, len: u8) -> NewRecord {
    NewRecord {
        device: format!("dev-{device}"),
        // The id determines the reading; the device sequence number rises with it.
        device_seq: if id.is_multiple_of(5) {
            None
        } else {
            Some(u64::from(id))
        },
        // Both kinds of dedup key: canonical UUIDs (as `protocol::reading_id` makes them) and others.
        reading_id: if id.is_multiple_of(2) {
            format!("5e1ec7ed-0000-5000-8000-{device:04x}{id:08x}")
        } else {
            format!("reading-{device}-{id}")
        },
        topic: TOPIC.into(),
        payload: vec![id; usize::from(len)],
    }
}

/// The journal's contract, in memory.
#[derive(Debug, Default)]
struct Model {
    pending: BTreeMap<u64, NewRecord>,
    next_seq: u64,
    cursors: BTreeMap<String, u64>,
}

impl Model {
    fn append(&mut self, batch: &[NewRecord], max_records: u64) -> Option<Vec<u64>> {
        let mut seqs = Vec::new();
        let mut new = Vec::new();
        let mut next = self.next_seq;
        for r in batch {
            let existing = self
                .pending
                .iter()
                .find(|(_, p)| p.reading_id == r.reading_id)
                .map(|(&s, _)| s)
                .or_else(|| {
                    new.iter()
                        .find(|(_, p): &&(u64, NewRecord)| p.reading_id == r.reading_id)
                        .map(|(s, _)| *s)
                });
            match existing {
                Some(s) => seqs.push(s),
                None => {
                    seqs.push(next);
                    new.push((next, r.clone()));
                    next += 1;
                }
            }
        }
        if self.pending.len() as u64 + new.len() as u64 > max_records {
            return None;
        }
        for (s, r) in new {
            if let Some(ds) = r.device_seq {
                let c = self.cursors.entry(r.device.clone()).or_insert(ds);
                *c = (*c).max(ds);
            }
            self.pending.insert(s, r);
        }
        self.next_seq = next;
        Some(seqs)
    }

    fn check(&self, j: &Journal) -> Result<(), TestCaseError> {
        let got = j.pending(None, usize::MAX).unwrap();
        let want: Vec<Record> = self
            .pending
            .iter()
            .map(|(&seq, r)| Record {
                seq,
                device: r.device.clone(),
                device_seq: r.device_seq,
                reading_id: r.reading_id.clone(),
                topic: r.topic.clone(),
                payload: r.payload.clone(),
            })
            .collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(j.depth(), self.pending.len() as u64);
        for d in 0..3 {
            let device = format!("dev-{d}");
            prop_assert_eq!(j.cursor(&device), self.cursors.get(&device).copied());
        }
        // Paging from the middle agrees with the whole list.
        if let Some(mid) = want.get(want.len() / 2) {
            prop_assert_eq!(
                j.pending(Some(mid.seq), 3).unwrap(),
                want[want.len() / 2 + 1..]
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
            );
        }
        prop_assert_eq!(segment_files(&j.cfg.dir).len(), j.segments());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random appends, acks and restarts against an in-memory model: the pending sets are equal, in seq
    /// order, with the same cursors, after every step; every restart is clean.
    #[test]
    fn journal_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let c = JournalConfig { max_records: 12, segment_bytes: 400, ..cfg(tmp.path()) };
        let mut model = Model { next_seq: 1, ..Model::default() };
        let (mut j, _) = open(&c);
        for op in ops {
            match op {
                Op::Append(spec) => {
                    let batch: Vec<NewRecord> = spec.iter().map(|&(d, i, l)| model_record(d, i, l)).collect();
                    match (model.append(&batch, c.max_records), j.append(&batch)) {
                        (Some(want), Ok(got)) => prop_assert_eq!(got, want),
                        (None, Err(e)) => prop_assert!(matches!(e, JournalError::Full { .. }), "{:?}", e),
                        (want, got) => prop_assert!(false, "model {:?} journal {:?}", want, got),
                    }
                }
                Op::Ack(idx) => {
                    let seqs: Vec<u64> = model.pending.keys().copied().collect();
                    let mut chosen: Vec<u64> = if seqs.is_empty() { vec![] } else { idx.iter().map(|i| *i.get(&seqs)).collect() };
                    // A stale, already-acked seq (a repeated PUBACK) is ignored.
                    if let Some(stale) = (1..model.next_seq).find(|s| !model.pending.contains_key(s)) {
                        chosen.push(stale);
                    }
                    j.ack(&chosen).unwrap();
                    for s in chosen {
                        model.pending.remove(&s);
                    }
                }
                Op::Reopen => {
                    drop(j);
                    let (j2, r) = open(&c);
                    prop_assert!(r.is_clean(), "{:?}", r);
                    prop_assert_eq!(r.records, model.pending.len() as u64);
                    prop_assert_eq!(r.next_seq, model.next_seq);
                    j = j2;
                }
            }
            model.check(&j)?;
        }
    }

    /// Power lost in the middle of a group commit (the file ends anywhere inside the batch's write):
    /// recovery keeps everything accepted before, plus the batch's complete frames — which the caller
    /// was never told about and will re-append harmlessly — and never reports corruption.
    #[test]
    fn power_loss_inside_a_group_commit_keeps_a_prefix(
        before in 0usize..4,
        batch in 1usize..8,
        cut_permille in 0u64..1000,
        acked_before in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        let (mut j, _) = open(&c);
        let mut accepted = Vec::new();
        for i in 0..before {
            let id = format!("old{i}");
            j.append(&[rec("m", i as u64 + 1, &id)]).unwrap();
            accepted.push(id);
        }
        if acked_before && !accepted.is_empty() {
            j.ack(&[1]).unwrap();
            accepted.remove(0);
        }
        let (path, start) = j.active_segment();
        let records: Vec<NewRecord> = (0..batch).map(|i| rec("m", 100 + i as u64, &format!("new{i}"))).collect();
        // Frame boundaries inside the batch's write.
        let mut ends = Vec::new();
        let mut at = start;
        for r in &records {
            at += frame::append_frame_len(&r.device, &r.reading_id, &r.topic, &r.payload, true) as u64;
            ends.push(at);
        }
        j.append(&records).unwrap();
        drop(j);
        let cut = start + (at - start) * cut_permille / 1000;
        fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();

        let (mut j, r) = open(&c);
        prop_assert!(!r.has_corruption(), "{:?}", r);
        let complete = ends.iter().filter(|&&e| e <= cut).count();
        let mut want = accepted.clone();
        want.extend((0..complete).map(|i| format!("new{i}")));
        let got = j.pending(None, 100).unwrap();
        prop_assert_eq!(ids(&got), want.iter().map(String::as_str).collect::<Vec<_>>());
        prop_assert_eq!(r.torn_bytes > 0, !ends.contains(&cut) && cut != start, "{:?}", r);
        let want_cursor = if complete > 0 { Some(100 + complete as u64 - 1) } else if before > 0 { Some(before as u64) } else { None };
        prop_assert_eq!(j.cursor("m"), want_cursor);
        // The device still has the batch: re-appending it doubles nothing, and it survives a restart.
        j.append(&records).unwrap();
        drop(j);
        let (j, r) = open(&c);
        prop_assert!(r.is_clean(), "{:?}", r);
        prop_assert_eq!(j.depth() as usize, accepted.len() + batch);
    }

    /// Whatever bytes a segment holds, `open` does not panic, and what it opens works.
    #[test]
    fn open_never_panics_on_arbitrary_segment_bytes(
        garbage in proptest::collection::vec(any::<u8>(), 0..300),
        keep_valid_prefix in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path());
        if keep_valid_prefix {
            let (mut j, _) = open(&c);
            let (p, _, end) = append_singles(&mut j, 2);
            drop(j);
            let file = fs::OpenOptions::new().write(true).open(&p).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, &garbage, end).unwrap();
        } else {
            fs::create_dir_all(&c.dir).unwrap();
            fs::write(segment_path(&c.dir, 7), &garbage).unwrap();
        }
        if let Ok((mut j, r)) = Journal::open(c.clone()) {
            if keep_valid_prefix {
                prop_assert!(r.records >= 2);
            }
            let seqs = j.append(&[rec("m", 100, "after")]).unwrap();
            drop(j);
            let (j, _) = open(&c);
            prop_assert!(j.pending(None, 100).unwrap().iter().any(|p| p.seq == seqs[0]));
        }
    }
}

/// Disk bytes per record, measured at the block device (not the page cache): 64-record batches of
/// 100-byte payloads, then the same acked. `JOURNAL_BENCH_DEV=vda cargo test -p gateway --release
/// journal_disk_bytes_per_record -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: needs a quiet machine and /sys/block/<dev>/stat"]
fn journal_disk_bytes_per_record() {
    fn sectors_written(dev: &str) -> u64 {
        let stat = fs::read_to_string(format!("/sys/block/{dev}/stat")).expect("block device stat");
        stat.split_whitespace()
            .nth(6)
            .and_then(|s| s.parse().ok())
            .expect("sectors written")
    }
    let dev = std::env::var("JOURNAL_BENCH_DEV").unwrap_or_else(|_| "vda".into());
    let root = std::env::var("JOURNAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::tempdir_in(root).unwrap();
    let c = JournalConfig {
        max_records: MAX_RECORDS_LIMIT,
        max_bytes: 1 << 30,
        ..JournalConfig::new(tmp.path().join("j"))
    };
    let (mut j, _) = open(&c);
    let batches = 2000u64;
    let batch = |b: u64| -> Vec<NewRecord> {
        (0..64)
            .map(|i| NewRecord {
                device: "meter-0001".into(),
                device_seq: Some(b * 64 + i),
                reading_id: format!("gls-0001-{:08}", b * 64 + i),
                topic: TOPIC.into(),
                payload: vec![b'x'; 100],
            })
            .collect()
    };
    let sync = || {
        // Flush everything to the device, then let its counters settle.
        let _ = std::process::Command::new("sync").status();
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    sync();
    let (s0, w0, t0) = (
        sectors_written(&dev),
        j.bytes_written(),
        std::time::Instant::now(),
    );
    let mut all = Vec::new();
    for b in 0..batches {
        all.push(j.append(&batch(b)).unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    sync();
    let s1 = sectors_written(&dev);
    let n = (batches * 64) as f64;
    println!(
        "append: {:.0} records/s, {:.0} disk bytes/record, {:.0} journal bytes/record",
        n / secs,
        (s1 - s0) as f64 * 512.0 / n,
        (j.bytes_written() - w0) as f64 / n
    );
    let (s1, w1, t1) = (
        sectors_written(&dev),
        j.bytes_written(),
        std::time::Instant::now(),
    );
    for seqs in all {
        j.ack(&seqs).unwrap();
    }
    let secs = t1.elapsed().as_secs_f64();
    sync();
    let s2 = sectors_written(&dev);
    println!(
        "ack: {:.0} records/s, {:.0} disk bytes/record, {:.0} journal bytes/record",
        n / secs,
        (s2 - s1) as f64 * 512.0 / n,
        (j.bytes_written() - w1) as f64 / n
    );
}

#[test]
fn unsynced_acks_are_synced_once_due_unless_an_append_synced_them_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut j, _) = open(&cfg(tmp.path()));
    let hour = Duration::from_secs(3600);
    j.append(&[rec("m", 1, "a"), rec("m", 2, "b"), rec("m", 3, "c")])
        .unwrap();
    assert_eq!(j.sync_acks_older_than(hour).unwrap(), None);
    let before = j.fsyncs();
    j.ack_unsynced(&[1]).unwrap();
    let due = j.acks_due(hour).expect("an ack is unsynced");
    // Not yet due: no fdatasync, and the same deadline (the first unsynced ack's, not the last one's).
    j.ack_unsynced(&[2]).unwrap();
    assert_eq!(j.sync_acks_older_than(hour).unwrap(), Some(due));
    assert_eq!(j.fsyncs(), before);
    // An append's fdatasync carries them: nothing left to sync, no deadline.
    j.append(&[rec("m", 4, "d")]).unwrap();
    assert_eq!(j.fsyncs(), before + 1);
    assert_eq!(j.acks_due(hour), None);
    assert_eq!(j.sync_acks_older_than(Duration::ZERO).unwrap(), None);
    assert_eq!(j.fsyncs(), before + 1);
    // A later ack starts a new deadline; once due it is synced.
    j.ack_unsynced(&[3]).unwrap();
    assert!(j.acks_due(hour).is_some_and(|d| d > due));
    assert_eq!(j.sync_acks_older_than(Duration::ZERO).unwrap(), None);
    assert!(!j.has_unsynced_acks());
    assert_eq!(j.fsyncs(), before + 2);
}

#[test]
fn unsynced_acks_survive_a_process_restart_and_are_synced_by_the_next_append_or_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path());
    {
        let (mut j, _) = open(&c);
        j.append(&[rec("m", 1, "a"), rec("m", 2, "b"), rec("m", 3, "c")])
            .unwrap();
        j.ack_unsynced(&[1]).unwrap();
        assert!(j.has_unsynced_acks());
        // An append's fdatasync covers the ack frame written before it.
        j.append(&[rec("m", 4, "d")]).unwrap();
        assert!(!j.has_unsynced_acks());
        j.ack_unsynced(&[2]).unwrap();
        assert!(j.has_unsynced_acks());
        j.sync().unwrap();
        assert!(!j.has_unsynced_acks());
        j.ack_unsynced(&[3]).unwrap();
        // Dropped without a sync: a process crash; the frame is in the page cache.
    }
    let (j, r) = open(&c);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(ids(&j.pending(None, 10).unwrap()), ["d"]);
}

#[test]
fn a_failed_sync_of_unsynced_acks_poisons_and_a_roll_syncs_them_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path());
    c.segment_bytes = 256;
    let (mut j, _, faults) = open_faulty(&c);
    j.append(&[rec("m", 1, "a")]).unwrap();
    j.ack_unsynced(&[1]).unwrap();
    let segments = j.segments();
    // This append does not fit the small segment, so it rolls — and the roll must fdatasync the old
    // segment's unsynced ack first: with syncs failing, that is the failure (and it poisons), rather
    // than the new segment's creation (a clean failure).
    faults.lock().unwrap().sync_fails = true;
    let err = j
        .append(&[rec("m", 2, "b"), rec("m", 3, "c"), rec("m", 4, "d")])
        .unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::Io {
                op: "fdatasync",
                ..
            }
        ),
        "{err}"
    );
    assert!(j.is_poisoned());
    assert_eq!(j.segments(), segments, "no segment was created");
    drop(j);

    let (mut j, _, faults) = open_faulty(&c);
    let seqs = j.append(&[rec("m", 5, "e")]).unwrap();
    j.ack_unsynced(&seqs).unwrap();
    faults.lock().unwrap().sync_fails = true;
    assert!(matches!(j.sync(), Err(JournalError::Io { .. })));
    assert!(j.is_poisoned());
}

/// The process's resident set, its peak, and its anonymous part (heap and stacks, without the pages of
/// the executable), in KiB, from `/proc/self/status`.
fn rss_kib() -> (u64, u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"), field("RssAnon:"))
}

/// Memory with 100 000 pending records of 600-byte payloads (UUID reading ids, as in production):
/// prints the process RSS before and after appending them, and that of a fresh process recovering the
/// journal (a child run of this test: in this process the freed memory of the first journal would
/// blur the figure). Not an assertion — a measurement:
/// `cargo test -p gateway --lib journal_memory_with_100k_pending -- --ignored --nocapture`
/// (`JOURNAL_RSS_STEPS=1` also prints it every 12 800 records).
#[test]
#[ignore = "a measurement: prints RSS; run alone with --nocapture"]
fn journal_memory_with_100k_pending() {
    const N: u64 = 100_000;
    const REOPEN: &str = "JOURNAL_RSS_REOPEN_DIR";
    let c = |dir: PathBuf| JournalConfig {
        max_records: N,
        max_bytes: 1 << 30,
        ..JournalConfig::new(dir)
    };
    if let Some(dir) = std::env::var_os(REOPEN) {
        // The child: recover the journal the parent wrote, then read every record back once.
        let (rss0, _, anon0) = rss_kib();
        let (j, r) = open(&c(dir.into()));
        assert_eq!(r.records, N);
        let (rss1, hwm1, anon1) = rss_kib();
        let mut after = None;
        while let Some(last) = j.pending(after, 256).unwrap().last() {
            after = Some(last.seq);
        }
        let (rss2, hwm2, anon2) = rss_kib();
        println!(
            "fresh process, open (recovery): RSS {rss0} KiB before, {rss1} KiB after (peak {hwm1} KiB); \
             anonymous {anon0} KiB before, {anon1} KiB after"
        );
        println!(
            "  after reading all {N} back in pages of 256: RSS {rss2} KiB (peak {hwm2} KiB), anonymous {anon2} KiB"
        );
        return;
    }

    let tmp = tempfile::tempdir().unwrap();
    let c = c(tmp.path().join("j"));
    let (rss0, _, anon0) = rss_kib();
    let (mut j, _) = open(&c);
    let mut n = 0u64;
    while n < N {
        let batch: Vec<NewRecord> = (n..(n + 64).min(N))
            .map(|i| NewRecord {
                device: "meter-0001".into(),
                device_seq: Some(i),
                reading_id: format!("{:08x}-9cc1-5407-9253-{:012x}", i, i * 7919),
                topic: TOPIC.into(),
                payload: vec![b'x'; 600],
            })
            .collect();
        n += batch.len() as u64;
        j.append(&batch).unwrap();
        if std::env::var_os("JOURNAL_RSS_STEPS").is_some() && n.is_multiple_of(12_800) {
            let (rss, _, anon) = rss_kib();
            println!("{n}: RSS {rss} KiB, anonymous {anon} KiB");
        }
    }
    assert_eq!(j.depth(), N);
    assert_eq!(j.pending(None, 1).unwrap().len(), 1);
    let (rss1, hwm1, anon1) = rss_kib();
    println!(
        "100k pending: RSS {rss0} KiB before, {rss1} KiB after appending (peak {hwm1} KiB); \
         anonymous {anon0} KiB before, {anon1} KiB after; pending_bytes {} ({} B/record on disk)",
        j.pending_bytes(),
        j.pending_bytes() / N
    );
    drop(j);

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "journal::tests::journal_memory_with_100k_pending",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(REOPEN, &c.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in stdout.lines().filter(|l| l.contains("RSS")) {
        println!("{line}");
    }
}

/// Issue 14 item 6: with a [`KeepAfter`], acked records after the keep seq stay on disk — through segment
/// rolls and a restart (which otherwise deletes every segment without a pending record) — and `open`
/// hands them back once, in seq order; once the keep seq moves past them, their segments go as usual.
#[test]
fn records_after_the_keep_seq_survive_ack_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 250,
        ..cfg(tmp.path())
    };
    let keep = KeepAfter::new(Some(0));
    let (mut j, _) = Journal::open_keeping(c.clone(), keep.clone()).unwrap();
    assert!(j.take_replay().is_empty());
    let mut seqs = Vec::new();
    for i in 1..=6u64 {
        seqs.extend(j.append(&[rec("m", i, &format!("r-{i}"))]).unwrap());
    }
    // The snapshot includes the first two; everything is delivered.
    keep.set(Some(seqs[1]));
    let before = segment_files(&c.dir).len();
    assert!(before > 2, "the records span several segments: {before}");
    j.ack(&seqs).unwrap();
    assert_eq!(j.depth(), 0);
    // Without a keep seq only the active segment would be left.
    assert!(
        segment_files(&c.dir).len() > 1,
        "the segments of r-3 … r-6 are kept"
    );
    drop(j);

    let (mut j, r) = Journal::open_keeping(c.clone(), keep.clone()).unwrap();
    assert_eq!(r.records, 0, "nothing pending");
    let kept = j.take_replay();
    assert_eq!(ids(&kept), ["r-3", "r-4", "r-5", "r-6"]);
    assert_eq!(kept[0].seq, seqs[2]);
    assert!(j.take_replay().is_empty(), "handed out once");

    // The next snapshot includes them all: the next ack (or open) deletes their segments.
    keep.set(Some(seqs[5]));
    let more = j.append(&[rec("m", 7, "r-7")]).unwrap();
    j.ack(&more).unwrap();
    assert_eq!(segment_files(&c.dir).len(), 1, "only the active segment");
    drop(j);

    // Without a keep seq (alerts off), a restart keeps nothing acked, as before.
    let (mut j, _) = open(&c);
    assert!(j.take_replay().is_empty());
}

/// A full disk outranks the edge alerts' replay: when a new segment cannot be created for want of space,
/// the delivered segments a [`KeepAfter`] held are deleted (on a full disk no reading arrives, so the
/// edge engine's next snapshot — which would move the keep — never comes, and the disk would stay full:
/// `tests/tests/gateway_e2e.rs` `disk_full_stops_downloading_and_recovers_when_space_returns` hung at
/// 10 334 of 20 000 records). Once a segment can be created again, the keep holds as before.
#[test]
fn a_full_disk_deletes_the_segments_kept_for_the_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 250,
        ..cfg(tmp.path())
    };
    let storage = FaultyStorage::default();
    let faults = storage.0.clone();
    let keep = KeepAfter::new(Some(0));
    let (mut j, _) = Journal::open_inner(c.clone(), Box::new(storage), Some(keep.clone())).unwrap();
    let mut seqs = Vec::new();
    for i in 1..=6u64 {
        seqs.extend(j.append(&[rec("m", i, &format!("r-{i}"))]).unwrap());
    }
    j.ack(&seqs).unwrap();
    let kept = segment_files(&c.dir).len();
    assert!(kept > 2, "delivered segments kept for the replay: {kept}");

    // The disk fills: the next segment cannot be created.
    faults.lock().unwrap().create_fails = true;
    let mut i = 7u64;
    let err = loop {
        match j.append(&[rec("m", i, &format!("r-{i}"))]) {
            Ok(s) => j.ack(&s).unwrap(),
            Err(e) => break e,
        }
        i += 1;
        assert!(i < 50, "a roll was expected");
    };
    assert!(
        matches!(&err, JournalError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
        "{err}"
    );
    assert_eq!(
        segment_files(&c.dir).len(),
        1,
        "only the active segment is left: the kept ones made room"
    );

    // Space again: the append goes through, and the keep holds again for what comes after.
    let more = j.append(&[rec("m", i, &format!("r-{i}"))]).unwrap();
    j.ack(&more).unwrap();
    for k in i + 1..i + 6 {
        let s = j.append(&[rec("m", k, &format!("r-{k}"))]).unwrap();
        j.ack(&s).unwrap();
    }
    assert!(
        segment_files(&c.dir).len() > 1,
        "kept again once the disk has room"
    );
}

/// The same at open: a journal whose disk is full of segments only the keep holds opens (they are
/// deleted to make room for the new active segment), and their records are still handed to the replay.
#[test]
fn a_journal_full_of_kept_segments_opens_on_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let c = JournalConfig {
        segment_bytes: 250,
        ..cfg(tmp.path())
    };
    let keep = KeepAfter::new(Some(0));
    let (mut j, _) = Journal::open_keeping(c.clone(), keep.clone()).unwrap();
    let mut seqs = Vec::new();
    for i in 1..=6u64 {
        seqs.extend(j.append(&[rec("m", i, &format!("r-{i}"))]).unwrap());
    }
    j.ack(&seqs).unwrap();
    drop(j);
    assert!(segment_files(&c.dir).len() > 2);

    let storage = FaultyStorage::default();
    storage.0.lock().unwrap().create_fails = true;
    let (mut j, _) = Journal::open_inner(c.clone(), Box::new(storage), Some(keep))
        .expect("opens on a full disk");
    assert_eq!(
        ids(&j.take_replay()),
        ["r-1", "r-2", "r-3", "r-4", "r-5", "r-6"]
    );
    assert_eq!(
        segment_files(&c.dir).len(),
        1,
        "only the new active segment"
    );
}
