//! `tapnat capture`: frames as the gateway reads and writes them, in a
//! classic pcap file (microsecond timestamps, link type Ethernet) that
//! tcpdump and Wireshark read. Frames read from a device are as they
//! arrived, before translation; frames written are as they left, after it.
//! The gateway streams the file over the control socket; the client copies
//! it record by record to the file (or stdout), so a capture cut short
//! still leaves a readable file.
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::gateway::taps::{side_bit, CaptureTap, Captured};
use crate::policy::Side;

/// The largest frame recorded whole (a TSO super-frame is up to 64 KiB
/// plus headers); longer ones are cut.
pub const SNAPLEN: u32 = 262_144;
/// pcap's link type for Ethernet.
const LINKTYPE_ETHERNET: u32 = 1;

/// What to capture, as `tapnat capture` asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureSpec {
    /// `pod`, `uplink` or `both`.
    pub side: String,
    /// Stop after this many frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl CaptureSpec {
    /// The [`side_bit`]s of `side`.
    pub fn sides(&self) -> Option<u8> {
        Some(match self.side.as_str() {
            "pod" => side_bit(Side::Pod),
            "uplink" => side_bit(Side::Uplink),
            "both" => side_bit(Side::Pod) | side_bit(Side::Uplink),
            _ => return None,
        })
    }
}

/// The pcap global header.
pub fn file_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// Appends one record (header and the frame, cut at [`SNAPLEN`]).
pub fn record(out: &mut Vec<u8>, unix_us: u64, frame: &[u8]) {
    let kept = frame.len().min(SNAPLEN as usize);
    let secs = (unix_us / 1_000_000) as u32;
    let micros = (unix_us % 1_000_000) as u32;
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&micros.to_le_bytes());
    out.extend_from_slice(&(kept as u32).to_le_bytes());
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame[..kept]);
}

/// Why a capture stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// `count` frames were written.
    Count,
    /// `seconds` passed.
    Time,
    /// The client went away (or stopped reading).
    Client,
}

/// Streams a capture of `spec` to `out` until its count or time is up or
/// `gone` says the client left (checked at least once a second). The
/// frames come from `tap`; only one capture runs at a time.
pub fn stream(
    tap: &std::sync::Arc<CaptureTap>,
    spec: &CaptureSpec,
    out: &mut impl Write,
    mut gone: impl FnMut() -> bool,
) -> Result<Ended, String> {
    let sides = spec
        .sides()
        .ok_or_else(|| format!("--side {}: expected pod, uplink or both", spec.side))?;
    let run = tap
        .start(sides)
        .ok_or_else(|| "a capture is already running".to_string())?;
    let deadline = spec
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s.clamp(0.0, 1e9)));
    if out.write_all(&file_header()).is_err() {
        return Ok(Ended::Client);
    }
    let mut written = 0u64;
    let mut buf = Vec::new();
    loop {
        if spec.count.is_some_and(|n| written >= n) {
            return Ok(Ended::Count);
        }
        let wait = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left.min(Duration::from_secs(1)),
                None => return Ok(Ended::Time),
            },
            None => Duration::from_secs(1),
        };
        match run.next(wait) {
            Ok(Captured { unix_us, frame, .. }) => {
                buf.clear();
                record(&mut buf, unix_us, &frame);
                if out.write_all(&buf).is_err() {
                    return Ok(Ended::Client);
                }
                written += 1;
            }
            Err(_) => {
                if gone() {
                    return Ok(Ended::Client);
                }
            }
        }
    }
}

/// Copies a pcap stream from `from` to `to` record by record, flushing
/// each, until the stream ends. Returns the records copied.
pub fn copy_records(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut header = [0u8; 24];
    from.read_exact(&mut header)?;
    to.write_all(&header)?;
    to.flush()?;
    let mut n = 0;
    let mut rec = [0u8; 16];
    let mut data = Vec::new();
    loop {
        match from.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]);
        if len > SNAPLEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("capture record of {len} bytes"),
            ));
        }
        data.resize(len as usize, 0);
        from.read_exact(&mut data)?;
        to.write_all(&rec)?;
        to.write_all(&data)?;
        to.flush()?;
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::stats::Counters;
    use crate::gateway::taps::{Taps, Way};

    #[test]
    fn header_and_records_are_classic_pcap() {
        let h = file_header();
        assert_eq!(&h[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 1);
        let mut r = Vec::new();
        record(&mut r, 1_700_000_000_250_000, &[9; 60]);
        assert_eq!(r.len(), 16 + 60);
        assert_eq!(
            u32::from_le_bytes(r[0..4].try_into().unwrap()),
            1_700_000_000
        );
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 250_000);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), 60);
        assert_eq!(u32::from_le_bytes(r[12..16].try_into().unwrap()), 60);
    }

    #[test]
    fn a_stream_stops_at_its_count_and_copies_back_whole() {
        let taps = Taps::default();
        let cap = taps.capture.clone();
        let c = Counters::default();
        let spec = CaptureSpec {
            side: "pod".into(),
            count: Some(3),
            seconds: Some(5.0),
        };
        let producer = std::thread::spawn(move || {
            while cap.sides() == 0 {
                std::thread::yield_now();
            }
            for i in 0..5u8 {
                cap.offer(Side::Pod, Way::In, &[i; 42], &c);
            }
        });
        let mut out = Vec::new();
        assert_eq!(
            stream(&taps.capture, &spec, &mut out, || false),
            Ok(Ended::Count)
        );
        producer.join().unwrap();
        assert_eq!(taps.capture.sides(), 0, "off once the stream ended");
        let mut copy = Vec::new();
        assert_eq!(copy_records(&mut &out[..], &mut copy).unwrap(), 3);
        assert_eq!(copy, out);
        let bad = CaptureSpec {
            side: "left".into(),
            count: None,
            seconds: None,
        };
        assert!(stream(&taps.capture, &bad, &mut Vec::new(), || true).is_err());
        let timed = CaptureSpec {
            side: "both".into(),
            count: None,
            seconds: Some(0.05),
        };
        assert_eq!(
            stream(&taps.capture, &timed, &mut Vec::new(), || false),
            Ok(Ended::Time)
        );
    }
}
