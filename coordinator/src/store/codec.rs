//! The strict, versioned binary encoding of everything a coordinator writes
//! to disk or sends to another coordinator: log entries, the vote, state
//! machine records, snapshots and Raft RPC payloads.
//!
//! Every value is an envelope: the two magic bytes `TL`, one byte of format
//! version, then the value in postcard. Decoding refuses another magic, a
//! version this build does not read, and trailing bytes, so a value either
//! decodes to exactly what was encoded or fails with a message that says
//! which. Postcard has no way to spell a float as `null`, so the JSON trap
//! (a NaN written as `null` that can never be read back) cannot recur; the
//! validators keep non-finite numbers out anyway.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every encoded value.
pub const MAGIC: [u8; 2] = *b"TL";
/// Version of the envelope's payload encoding (postcard, serde field order):
/// 6 since a log entry can be a batch of writes and audit entries are
/// keyed by log index and position (data format 7); 5 since the state holds the gateway's chain (data format 6); 4 since
/// it holds tenants, key policies and usage (format 5); 3 since replicas can be stages of a pipeline across nodes (format
/// 4); 2 added their GPU list and MIG device (format 3).
pub const ENCODING_VERSION: u8 = 6;
/// The envelope version of data format 6, which only the migration reads.
pub const FORMAT_6_ENCODING: u8 = 5;
/// The envelope version of data format 2, which only the migration reads.
pub const FORMAT_2_ENCODING: u8 = 1;
/// The envelope version of data format 3, which only the migration reads.
pub const FORMAT_3_ENCODING: u8 = 2;
/// The envelope version of data format 4, which only the migration reads.
pub const FORMAT_4_ENCODING: u8 = 3;
/// The envelope version of data format 5, which only the migration reads.
pub const FORMAT_5_ENCODING: u8 = 4;
const HEADER: usize = MAGIC.len() + 1;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("value is {0} bytes, shorter than the {HEADER}-byte envelope header")]
    Short(usize),
    #[error("value does not start with the Talon envelope (found {found:02x?}); it was written by another program or an older release without migration")]
    Magic { found: Vec<u8> },
    #[error("value has encoding version {found}; this build reads version {ENCODING_VERSION}: run the matching release")]
    Version { found: u8 },
    #[error("value is malformed: {0}")]
    Malformed(postcard::Error),
    #[error("value has {0} unexpected bytes after its end")]
    Trailing(usize),
    #[error("value cannot be encoded: {0}")]
    Encode(postcard::Error),
}

/// Encodes `value` in the envelope.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.push(ENCODING_VERSION);
    postcard::to_extend(value, out).map_err(CodecError::Encode)
}

/// Decodes a value written by [`encode`], refusing anything else.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_version(bytes, ENCODING_VERSION)
}

/// The envelope version of `bytes`, if they carry the envelope.
pub fn version_of(bytes: &[u8]) -> Option<u8> {
    is_encoded(bytes).then(|| bytes[MAGIC.len()])
}

/// Decodes a value of data format 2 (envelope version 1), reading every
/// replica in it in the format-2 layout; for the migration.
pub fn decode_format_2<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    crate::state::replica::in_format_2(|| decode_version(bytes, FORMAT_2_ENCODING))
}

/// Decodes a value of data format 3 (envelope version 2), reading every
/// replica in it in the format-3 layout; for the migration.
pub fn decode_format_3<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    crate::state::replica::in_format_3(|| decode_version(bytes, FORMAT_3_ENCODING))
}

/// Decodes a value of data format 4 (envelope version 3), reading the
/// state in it without tenancy; for the migration.
pub fn decode_format_4<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    crate::state::replica::in_format_4(|| decode_version(bytes, FORMAT_4_ENCODING))
}

/// Decodes a value of data format 5 (envelope version 4), reading the
/// state in it without the chain; for the migration.
pub fn decode_format_5<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    crate::state::replica::in_format_5(|| decode_version(bytes, FORMAT_5_ENCODING))
}

/// Decodes a value of data format 6 (envelope version 5): the same types,
/// before batches; for the migration.
pub fn decode_format_6<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_version(bytes, FORMAT_6_ENCODING)
}

/// Encodes `value` as data format 6 wrote it (tests build format-6
/// directories with it).
#[cfg(test)]
pub fn encode_format_6<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = encode(value)?;
    out[MAGIC.len()] = FORMAT_6_ENCODING;
    Ok(out)
}

/// Encodes `value` as data format 5 wrote it (tests build format-5
/// directories with it).
#[cfg(test)]
pub fn encode_format_5<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = crate::state::replica::in_format_5(|| encode(value))?;
    out[MAGIC.len()] = FORMAT_5_ENCODING;
    Ok(out)
}

/// Encodes `value` as data format 4 wrote it (tests build format-4
/// directories with it).
#[cfg(test)]
pub fn encode_format_4<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = crate::state::replica::in_format_4(|| encode(value))?;
    out[MAGIC.len()] = FORMAT_4_ENCODING;
    Ok(out)
}

/// Encodes `value` as data format 2 wrote it (tests build format-2
/// directories with it).
#[cfg(test)]
pub fn encode_format_2<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = crate::state::replica::in_format_2(|| encode(value))?;
    out[MAGIC.len()] = FORMAT_2_ENCODING;
    Ok(out)
}

fn decode_version<T: DeserializeOwned>(bytes: &[u8], version: u8) -> Result<T, CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Short(bytes.len()));
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(CodecError::Magic {
            found: bytes[..MAGIC.len()].to_vec(),
        });
    }
    if bytes[MAGIC.len()] != version {
        return Err(CodecError::Version {
            found: bytes[MAGIC.len()],
        });
    }
    let (value, rest) =
        postcard::take_from_bytes(&bytes[HEADER..]).map_err(CodecError::Malformed)?;
    if !rest.is_empty() {
        return Err(CodecError::Trailing(rest.len()));
    }
    Ok(value)
}

/// Whether `bytes` already carry the envelope (the migration skips those).
pub fn is_encoded(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER && bytes[..MAGIC.len()] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_did_not_write() {
        let bytes = encode(&(7u64, "x".to_string())).unwrap();
        assert_eq!(
            decode::<(u64, String)>(&bytes).unwrap(),
            (7, "x".to_string())
        );
        assert!(matches!(decode::<u64>(b"{}"), Err(CodecError::Short(2))));
        assert!(matches!(
            decode::<u64>(b"{\"a\":1}"),
            Err(CodecError::Magic { .. })
        ));
        let mut other = bytes.clone();
        other[2] = 9;
        assert!(matches!(
            decode::<(u64, String)>(&other),
            Err(CodecError::Version { found: 9 })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<(u64, String)>(&longer),
            Err(CodecError::Trailing(1))
        ));
        assert!(matches!(
            decode::<(u64, String)>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed(_))
        ));
    }
}
