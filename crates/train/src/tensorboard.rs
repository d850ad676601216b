//! TensorBoard event files: TFRecord framing around serialized `tensorflow.Event` protobufs, with
//! the few fields scalar logging needs written by hand.
//!
//! TFRecord: for each record, `u64 length (LE)`, `u32 masked crc32c(length bytes)`, the data,
//! `u32 masked crc32c(data)`, where `mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`.
//!
//! Protobuf fields used (from `tensorflow/core/util/event.proto` and `summary.proto`):
//!
//! ```text
//! Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
//!              Summary summary = 5; SessionLog session_log = 7; }
//! Summary    { repeated Value value = 1; }
//! Value      { string tag = 1; float simple_value = 2; }
//! SessionLog { SessionStatus status = 1; }      // START = 1
//! ```
//!
//! The first event of a file carries `file_version = "brain.Event:2"`. A `SessionLog` START at step
//! `s` tells TensorBoard that the run restarted there: it discards the events at steps >= `s` that
//! earlier files hold (so a resumed run's curves have no doubled tail).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

pub const FILE_VERSION: &str = "brain.Event:2";
/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: u64 = 1;

const MASK_DELTA: u32 = 0xa282_ead8;

pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // ((crc >> 15) | (crc << 17)) + delta
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

// ---- protobuf encoding ---------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_int(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_double(&mut ev, 1, wall_time);
    put_int(&mut ev, 2, step as u64); // int64: two's complement varint
    ev
}

/// An `Event` with a scalar summary: one `Value { tag, simple_value }` per scalar.
pub fn encode_scalars_event(wall_time: f64, step: i64, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut v, 1, tag.as_bytes());
        put_float(&mut v, 2, *value as f32);
        put_bytes(&mut summary, 1, &v);
    }
    let mut ev = event_header(wall_time, step);
    put_bytes(&mut ev, 5, &summary);
    ev
}

/// The first event of a file.
pub fn encode_file_version_event(wall_time: f64) -> Vec<u8> {
    let mut ev = Vec::new();
    put_double(&mut ev, 1, wall_time);
    put_bytes(&mut ev, 3, FILE_VERSION.as_bytes());
    ev
}

/// `SessionLog { status: START }` at `step`.
pub fn encode_session_start_event(wall_time: f64, step: i64) -> Vec<u8> {
    let mut log = Vec::new();
    put_int(&mut log, 1, SESSION_START);
    let mut ev = event_header(wall_time, step);
    put_bytes(&mut ev, 7, &log);
    ev
}

/// One TFRecord around `data`.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut rec = Vec::with_capacity(data.len() + 16);
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    rec.extend_from_slice(data);
    rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    rec
}

/// The seconds since the Unix epoch (TensorBoard's wall time).
pub fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let from_file = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string());
    let name = from_file
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("COMPUTERNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Appends events to a new `events.out.tfevents.<unix seconds>.<host>` file in a directory. Each
/// event is written with one `write` call (no user-space buffer), so what was logged is on disk
/// for TensorBoard to read as soon as `add_*` returns.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Create the directory if needed and a new event file in it (never one that exists: a second
    /// file in the same second gets a `.1`, `.2`, ... suffix, which sorts after the first).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let now = unix_time();
        let base = format!("events.out.tfevents.{}.{}", now as u64, hostname());
        let mut n = 0;
        let (file, path) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        };
        let mut w = EventWriter { file, path };
        w.write_event(&encode_file_version_event(now))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame_record(event))
            .map_err(|e| TrainError::io(&self.path, e))
    }

    pub fn add_scalars(
        &mut self,
        step: i64,
        wall_time: f64,
        scalars: &[(&str, f64)],
    ) -> Result<()> {
        self.write_event(&encode_scalars_event(wall_time, step, scalars))
    }

    /// Mark a restart at `step`: TensorBoard drops earlier files' events at steps >= `step`.
    pub fn add_session_start(&mut self, step: i64, wall_time: f64) -> Result<()> {
        self.write_event(&encode_session_start_event(wall_time, step))
    }
}

// ---- reading (tests, tools) ----------------------------------------------------------------------

/// The fields of one decoded event that this module writes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// `(tag, simple_value)` of each summary value.
    pub scalars: Vec<(String, f32)>,
    /// `SessionLog.status`, where the event has a session log.
    pub session_status: Option<u64>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err(format!("truncated at byte {}", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    /// (field, wire type, payload for length-delimited / the value bits otherwise)
    fn field(&mut self) -> std::result::Result<(u32, u8, u64, &'a [u8]), String> {
        let key = self.varint()?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        match wire {
            0 => Ok((field, wire, self.varint()?, &[])),
            1 => Ok((
                field,
                wire,
                u64::from_le_bytes(self.take(8)?.try_into().unwrap()),
                &[],
            )),
            2 => {
                let n = self.varint()? as usize;
                Ok((field, wire, 0, self.take(n)?))
            }
            5 => Ok((
                field,
                wire,
                u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as u64,
                &[],
            )),
            w => Err(format!("unsupported wire type {w} for field {field}")),
        }
    }
}

/// Decode one serialized `Event` (unknown fields are skipped).
pub fn decode_event(data: &[u8]) -> std::result::Result<Event, String> {
    let mut ev = Event::default();
    let mut r = Reader { buf: data, pos: 0 };
    while !r.done() {
        match r.field()? {
            (1, 1, bits, _) => ev.wall_time = f64::from_bits(bits),
            (2, 0, v, _) => ev.step = v as i64,
            (3, 2, _, s) => ev.file_version = Some(String::from_utf8_lossy(s).into_owned()),
            (5, 2, _, summary) => {
                let mut rs = Reader {
                    buf: summary,
                    pos: 0,
                };
                while !rs.done() {
                    if let (1, 2, _, value) = rs.field()? {
                        let mut rv = Reader { buf: value, pos: 0 };
                        let (mut tag, mut val) = (String::new(), f32::NAN);
                        while !rv.done() {
                            match rv.field()? {
                                (1, 2, _, t) => tag = String::from_utf8_lossy(t).into_owned(),
                                (2, 5, bits, _) => val = f32::from_bits(bits as u32),
                                _ => {}
                            }
                        }
                        ev.scalars.push((tag, val));
                    }
                }
            }
            (7, 2, _, log) => {
                let mut rl = Reader { buf: log, pos: 0 };
                let mut status = 0;
                while !rl.done() {
                    if let (1, 0, v, _) = rl.field()? {
                        status = v;
                    }
                }
                ev.session_status = Some(status);
            }
            _ => {}
        }
    }
    Ok(ev)
}

/// Split TFRecord framing, verifying both CRCs of every record.
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let bad = |m: String| TrainError::bad_file(path, format!("record at byte {pos}: {m}"));
        if bytes.len() - pos < 12 {
            return Err(bad("truncated header".into()));
        }
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        if len_crc != masked_crc32c(len_bytes) {
            return Err(bad("length CRC mismatch".into()));
        }
        if bytes.len() - pos - 12 < len.saturating_add(4) {
            return Err(bad("truncated data".into()));
        }
        let data = &bytes[pos + 12..pos + 12 + len];
        let data_crc =
            u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        if data_crc != masked_crc32c(data) {
            return Err(bad("data CRC mismatch".into()));
        }
        out.push(data.to_vec());
        pos += 16 + len;
    }
    Ok(out)
}

/// Read and decode every event of a file.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    read_records(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            decode_event(r).map_err(|m| TrainError::bad_file(path, format!("event {i}: {m}")))
        })
        .collect()
}

/// The event files of a directory, in the order TensorBoard reads them (by name).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c::crc32c(b""), 0);
        // mask: ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8
        //     = (0x0001C60D | 0x25060000) + 0xa282ead8 = 0x2507C60D + 0xA282EAD8 = 0xC78AB0E5
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn varint_and_negative_steps() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let ev = decode_event(&encode_scalars_event(1.5, -3, &[("x", 2.0)])).unwrap();
        assert_eq!(ev.step, -3);
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalars(1, 100.25, &[("loss", 0.5), ("lr", 1e-5)])
            .unwrap();
        w.add_scalars(2, 101.0, &[("loss", 0.25)]).unwrap();
        w.add_session_start(2, 102.0).unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let w2 = EventWriter::create(dir.path()).unwrap();
        assert_ne!(w2.path(), w.path());
        assert_eq!(event_files(dir.path()).unwrap().len(), 2);

        let evs = read_events(w.path()).unwrap();
        assert_eq!(evs.len(), 4);
        assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(evs[0].wall_time > 1.6e9);
        assert_eq!(evs[1].step, 1);
        assert_eq!(evs[1].wall_time, 100.25);
        assert_eq!(
            evs[1].scalars,
            vec![("loss".to_string(), 0.5), ("lr".to_string(), 1e-5f32)]
        );
        assert_eq!(evs[2].step, 2);
        assert_eq!(evs[2].scalars, vec![("loss".to_string(), 0.25)]);
        assert_eq!(
            (evs[3].step, evs[3].session_status),
            (2, Some(SESSION_START))
        );

        // A flipped byte is caught by the CRC and reported with the file name.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 0x40;
        let bad = dir.path().join("corrupt.tfevents");
        std::fs::write(&bad, &bytes).unwrap();
        let e = read_events(&bad).unwrap_err().to_string();
        assert!(e.contains("corrupt.tfevents") && e.contains("CRC"), "{e}");
    }

    #[test]
    fn exact_bytes_of_a_scalar_event() {
        // Event{wall_time=1.0, step=5, summary{value{tag="a", simple_value=1.0}}}:
        // 09 <1.0 f64 LE>  10 05  2a 0a | 0a 08 | 0a 01 'a'  15 <1.0 f32 LE>
        // (Value = 3 + 5 = 8 bytes; Summary = 2 + 8 = 10 bytes)
        let ev = encode_scalars_event(1.0, 5, &[("a", 1.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0x05, 0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&1.0f32.to_le_bytes());
        assert_eq!(ev, want);
    }
}
