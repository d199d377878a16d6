//! The bytes of the replay messages: one tag byte (message kind and layout version), then the
//! message in bincode 2's standard configuration (variable-length integers, raw `f64`s), and
//! nothing after it. Decoding refuses a message longer than its kind may be, another tag, a
//! truncated message, trailing bytes and lengths beyond the bytes before allocating them.

use bincode::config::{self, Config};
use bincode::enc::write::{SizeWriter, Writer};
use bincode::error::DecodeError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ReplayError;

/// One message kind: its tag and the most bytes it may have.
pub(super) struct Kind {
    pub what: &'static str,
    pub tag: u8,
    pub max_len: usize,
}

/// Largest body bincode may claim in any replay message (each kind has its own, smaller
/// `max_len`).
const MAX_BODY: usize = 1 << 31;

fn standard() -> impl Config {
    config::standard().with_limit::<MAX_BODY>()
}

pub(super) fn encode<T: Serialize>(kind: &Kind, value: &T) -> Result<Vec<u8>, ReplayError> {
    let body = bincode::serde::encode_to_vec(value, standard())
        .map_err(|e| ReplayError::Encode { what: kind.what, reason: e.to_string() })?;
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(kind.tag);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Bytes of `value` as [`encode`] writes them, counted without writing them.
pub(super) fn encoded_len<T: Serialize>(kind: &Kind, value: &T) -> Result<usize, ReplayError> {
    let mut size = SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, standard())
        .map_err(|e| ReplayError::Encode { what: kind.what, reason: e.to_string() })?;
    Ok(1 + size.bytes_written)
}

/// Feeds `value`'s body, as [`encode`] writes it, to `sink` (a hasher) without building it.
pub(super) fn encode_into<T: Serialize, W: Writer>(
    what: &'static str,
    value: &T,
    sink: W,
) -> Result<(), ReplayError> {
    bincode::serde::encode_into_writer(value, sink, config::standard())
        .map_err(|e| ReplayError::Encode { what, reason: e.to_string() })
}

pub(super) fn decode<T: DeserializeOwned>(kind: &Kind, bytes: &[u8]) -> Result<T, ReplayError> {
    let what = kind.what;
    if bytes.len() > kind.max_len {
        return Err(ReplayError::TooLong { what, len: bytes.len(), max: kind.max_len });
    }
    let (&tag, body) = bytes.split_first().ok_or(ReplayError::Truncated { what })?;
    if tag != kind.tag {
        return Err(ReplayError::WrongTag { what, found: tag, expected: kind.tag });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(body, standard()).map_err(|e| match e {
            DecodeError::UnexpectedEnd { .. } => ReplayError::Truncated { what },
            e => ReplayError::Malformed { what, reason: e.to_string() },
        })?;
    if used != body.len() {
        return Err(ReplayError::TrailingBytes { what, extra: body.len() - used });
    }
    Ok(value)
}
