//! Record framing on disk (pure, no I/O).
//!
//! ```text
//! | length: u32 LE | crc32: u32 LE | offset: u64 LE | payload: length bytes |
//! ```
//! The CRC covers the offset and the payload. The offset is stored although it could be derived from
//! the segment's base and the record's position: it lets recovery and reads check that the file is
//! the sequence they expect (a record copied or left from an older file fails the check).

/// Bytes before the payload.
pub const HEADER_LEN: usize = 16;

/// Appends the frame of one record to `buf`.
pub fn encode(buf: &mut Vec<u8>, offset: u64, payload: &[u8]) {
    let offset_bytes = offset.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&offset_bytes);
    hasher.update(payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&hasher.finalize().to_le_bytes());
    buf.extend_from_slice(&offset_bytes);
    buf.extend_from_slice(payload);
}

/// The size of the frame of a payload of `len` bytes.
pub fn frame_len(len: usize) -> usize {
    HEADER_LEN + len
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record: its payload is `buf[HEADER_LEN..frame_len]`.
    Record { frame_len: usize },
    /// The buffer ends inside the frame; `needed` bytes are needed in all to decide.
    Incomplete { needed: usize },
    /// Not a valid record of the expected sequence.
    Corrupt { reason: String },
}

/// Decodes the frame at the start of `buf`, which must be the record `expected_offset`.
pub fn decode(buf: &[u8], expected_offset: u64, max_record_bytes: u32) -> Decoded {
    if buf.len() < HEADER_LEN {
        return Decoded::Incomplete { needed: HEADER_LEN };
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let offset = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    if len > max_record_bytes {
        return Decoded::Corrupt {
            reason: format!("length {len} is larger than max_record_bytes {max_record_bytes}"),
        };
    }
    let total = frame_len(len as usize);
    if buf.len() < total {
        return Decoded::Incomplete { needed: total };
    }
    let actual = crc32fast::hash(&buf[8..total]);
    if actual != crc {
        return Decoded::Corrupt {
            reason: format!("crc32 {actual:#010x} does not match the stored {crc:#010x}"),
        };
    }
    if offset != expected_offset {
        return Decoded::Corrupt {
            reason: format!("holds offset {offset} where offset {expected_offset} was expected"),
        };
    }
    Decoded::Record { frame_len: total }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, offset, payload);
        buf
    }

    #[test]
    fn encoded_record_decodes_back() {
        for payload in [&b""[..], b"x", &[7u8; 1000]] {
            let buf = framed(42, payload);
            assert_eq!(buf.len(), frame_len(payload.len()));
            assert_eq!(
                decode(&buf, 42, 4096),
                Decoded::Record {
                    frame_len: buf.len()
                }
            );
            assert_eq!(&buf[HEADER_LEN..], payload);
        }
    }

    #[test]
    fn short_buffers_are_incomplete_not_corrupt() {
        let buf = framed(3, b"hello");
        for cut in [0, 1, HEADER_LEN - 1] {
            assert_eq!(
                decode(&buf[..cut], 3, 4096),
                Decoded::Incomplete { needed: HEADER_LEN }
            );
        }
        for cut in [HEADER_LEN, buf.len() - 1] {
            assert_eq!(
                decode(&buf[..cut], 3, 4096),
                Decoded::Incomplete { needed: buf.len() }
            );
        }
    }

    #[test]
    fn flipped_bits_wrong_offsets_and_huge_lengths_are_corrupt() {
        let good = framed(9, b"payload");
        let mut flipped_payload = good.clone();
        *flipped_payload.last_mut().unwrap() ^= 1;
        let mut flipped_offset = good.clone();
        flipped_offset[8] ^= 1;
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let zeros = vec![0u8; 64];
        for (name, buf, expected) in [
            ("payload bit", &flipped_payload, 9),
            ("offset bit", &flipped_offset, 9),
            ("huge length", &huge, 9),
            ("other sequence", &good, 10),
            ("zeroed tail", &zeros, 0),
        ] {
            assert!(
                matches!(decode(buf, expected, 4096), Decoded::Corrupt { .. }),
                "{name}"
            );
        }
    }
}
