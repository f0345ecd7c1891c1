//! Random identifiers, tokens and passwords. All randomness comes from the operating system (`rand`'s
//! `OsRng` via `rand::rng()`, a CSPRNG seeded from it).

use domain::Timestamp;
use rand::Rng;
use rand::distr::{Alphanumeric, SampleString};

/// A 24-hex-digit id that sorts by creation time, like IoTDA's (and MongoDB's) ids: 4 bytes of seconds
/// since the epoch, 2 bytes of milliseconds, a 2-byte per-process counter (ids made in the same
/// millisecond still sort in creation order), then 4 random bytes. IoTDA pages lists by descending id, so
/// newer rows come first.
#[must_use]
pub fn object_id(now: Timestamp) -> String {
    use std::sync::atomic::{AtomicU16, Ordering};
    static COUNTER: AtomicU16 = AtomicU16::new(0);
    let ms = now.as_millis().max(0);
    let secs = u32::try_from(ms / 1000).unwrap_or(u32::MAX);
    let millis = u16::try_from(ms % 1000).unwrap_or(0);
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    bytes[4..6].copy_from_slice(&millis.to_be_bytes());
    bytes[6..8].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    rand::rng().fill(&mut bytes[8..]);
    hex::encode(bytes)
}

/// 32 lowercase hex digits (a project id, like Huawei Cloud's).
#[must_use]
pub fn hex32() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    hex::encode(bytes)
}

/// A UUID-shaped id (version 4 layout) for groups, as IoTDA's group ids look.
#[must_use]
pub fn uuid_like() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A bearer secret with 256 bits of entropy, URL-safe.
#[must_use]
pub fn token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    hex::encode(bytes)
}

/// A password or device secret of `len` letters and digits (valid for IoTDA's `[A-Za-z0-9_-]` rule).
#[must_use]
pub fn alphanumeric(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// A hexadecimal secret of `len` digits (LwM2M devices need hex secrets).
#[must_use]
pub fn hex_secret(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    rand::rng().fill(&mut bytes[..]);
    let mut s = hex::encode(bytes);
    s.truncate(len);
    s
}

/// The hex SHA-256 of `s`: how session ids and download tokens are stored.
#[must_use]
pub fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_sort_by_time_and_are_valid_task_ids() {
        let a = object_id(Timestamp::from_millis(1_700_000_000_000));
        let b = object_id(Timestamp::from_millis(1_700_000_000_001));
        assert!(a < b, "milliseconds order ids");
        let same: Vec<String> = (0..100)
            .map(|_| object_id(Timestamp::from_millis(1_700_000_000_002)))
            .collect();
        assert!(
            same.windows(2).all(|w| w[0] < w[1]),
            "ids of one millisecond keep creation order"
        );
        assert!(domain::TaskId::parse(a).is_ok());
    }

    #[test]
    fn generated_values_have_their_shapes() {
        assert!(domain::GroupId::parse(uuid_like()).is_ok());
        assert_eq!(token().len(), 64);
        assert_eq!(alphanumeric(20).len(), 20);
        let s = hex_secret(15);
        assert_eq!(s.len(), 15);
        assert!(s.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(token(), token());
    }
}
