//! TensorBoard event files (`report_to = tensorboard`): the scalars HF Trainer's TensorBoard
//! callback writes, under `OUTPUT/runs/`, readable by TensorBoard and its `EventAccumulator`.
//!
//! Format (TensorFlow's `record_writer` and `event.proto`/`summary.proto`): a file is a sequence
//! of records, each `len: u64 LE`, `masked_crc32c(len bytes): u32 LE`, `data`,
//! `masked_crc32c(data): u32 LE`; CRC-32C (Castagnoli) masked as `((c >> 15) | (c << 17)) +
//! 0xa282ead8`. Each record is one `Event` protobuf: `wall_time` (1, double), `step` (2, int64),
//! then `file_version` (3, "brain.Event:2") for the first record, a `Summary` (5) of
//! `Value { tag (1), simple_value (2, float) }`, or a `SessionLog` (7) `{ status (1): START }`.
//! The few fields are encoded by hand (a protobuf code generator would bring a build step for
//! five fields).
//!
//! Every run (fresh or resumed) creates a new file, named so that it sorts after the earlier
//! ones; nothing is ever rewritten. A resumed run starts its file with `SessionLog START` at the
//! first step it will log (the checkpoint's step + 1), so TensorBoard drops the earlier file's
//! points from that step on (its `purge_orphaned_data`: every point at a step ≥ the START's), as
//! it does for a restarted TensorFlow job.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder under the run's output directory (HF Trainer's `logging_dir` default).
pub const RUNS_DIR: &str = "runs";

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC-32C.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = CASTAGNOLI.checksum(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// What an event carries besides its time and step.
pub enum Payload<'a> {
    FileVersion,
    /// `(tag, value)` scalars.
    Scalars(&'a [(&'a str, f32)]),
    /// `SessionLog { status: START }`.
    SessionStart,
}

/// The `Event` protobuf of `payload` at `step`.
pub fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, (1 << 3) | 1); // wall_time, 64-bit
    out.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut out, 2 << 3); // step, varint (two's complement for negatives, as int64)
    varint(&mut out, step as u64);
    match payload {
        Payload::FileVersion => bytes_field(&mut out, 3, b"brain.Event:2"),
        Payload::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                varint(&mut value, (2 << 3) | 5); // simple_value, 32-bit
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        Payload::SessionStart => bytes_field(&mut out, 7, &[1 << 3, 1]),
    }
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends events to one new file under `OUTPUT/runs/`.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Create a new event file in `dir` (created if needed): `events.out.tfevents.<unix
    /// seconds, 10 digits>.zhllama.<n>`, `n` the first number no file of that second has. With
    /// `resumed_at` (the checkpoint's step), the file starts with a `SessionLog START` at the
    /// next step.
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let t = now();
        let stem = format!("events.out.tfevents.{:010}.zhllama", t as u64);
        let path = (0u32..)
            .map(|n| dir.join(format!("{stem}.{n}")))
            .find(|p| !p.exists())
            .expect("a free name");
        let mut head = tfrecord(&event(t, 0, Payload::FileVersion));
        if let Some(step) = resumed_at {
            head.extend(tfrecord(&event(t, step as i64 + 1, Payload::SessionStart)));
        }
        crate::util::write_atomic(&path, &head)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(EventWriter { path, file })
    }

    /// Append one event of `scalars` at `step` (nothing when `scalars` is empty).
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let rec = tfrecord(&event(now(), step as i64, Payload::Scalars(scalars)));
        self.file
            .write_all(&rec)
            .with_context(|| format!("cannot append to {}", self.path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The mask as TensorFlow's crc32c.h writes it, not as the implementation does.
    #[allow(clippy::manual_rotate)]
    #[test]
    fn crc32c_check_value_and_mask() {
        // CRC-32C's standard check value ("123456789" → 0xE3069283, RFC 3720 B.4's catalogue).
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xe306_9283);
        let c: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc32c(b"123456789"),
            ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn varints_as_protobuf_encodes_them() {
        // protobuf's documentation example: 150 → 96 01; 300 → ac 02.
        let enc = |v| {
            let mut o = Vec::new();
            varint(&mut o, v);
            o
        };
        assert_eq!(enc(150), [0x96, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(u64::MAX).len(), 10);
    }
}
