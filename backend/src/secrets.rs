//! Secrets that Updraft must read back in clear (device secrets for the MQTT HMAC check, application SKs
//! for request signatures) are sealed with XChaCha20-Poly1305 under a 256-bit key kept **outside** the
//! database: in `data/secret.key` (created on first start, mode 0600) or in `UPDRAFT_SECRET_KEY`. A copy of
//! the database alone reveals no secret.
//!
//! Sealed layout: `version (1 byte) | nonce (24 bytes) | ciphertext + tag`. The row id is bound as
//! associated data, so a sealed value copied onto another row does not open.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::Rng;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// Why a key could not be loaded or a value not opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key material is not 64 hex digits.
    #[error("the secret key must be 64 hexadecimal digits (32 bytes)")]
    BadKey,
    /// The key file could not be read or written.
    #[error("secret key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The value was sealed under another key, for another row, or was altered.
    #[error("a sealed secret could not be opened (wrong key, wrong row or corrupted)")]
    Open,
}

/// Seals and opens secrets with the installation's key, and derives download tokens from it.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    /// HMAC-SHA256 keyed with a subkey of the installation's key, for [`Sealer::derive_token`].
    tokens: Hmac<Sha256>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// A sealer with a key given as 64 hex digits.
    ///
    /// # Errors
    /// [`SecretsError::BadKey`] when `hex_key` is not 32 bytes of hex.
    pub fn from_hex(hex_key: &SecretString) -> Result<Self, SecretsError> {
        let key = SecretBox::new(Box::new(
            hex::decode(hex_key.expose_secret().trim()).map_err(|_| SecretsError::BadKey)?,
        ));
        if key.expose_secret().len() != 32 {
            return Err(SecretsError::BadKey);
        }
        let cipher = XChaCha20Poly1305::new_from_slice(key.expose_secret())
            .map_err(|_| SecretsError::BadKey)?;
        // A separate subkey, so tokens and sealed values never share a key.
        let mut sub = <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret())
            .map_err(|_| SecretsError::BadKey)?;
        sub.update(b"updraft download tokens v1");
        let tokens = <Hmac<Sha256> as Mac>::new_from_slice(&sub.finalize().into_bytes())
            .map_err(|_| SecretsError::BadKey)?;
        Ok(Self { cipher, tokens })
    }

    /// Loads the key from `path`, creating it (0600) with a fresh random key if it does not exist.
    ///
    /// # Errors
    /// [`SecretsError`] when the file cannot be read or created, or holds no valid key.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_hex(&SecretString::from(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut key = [0u8; 32];
                rand::rng().fill(&mut key);
                let text = SecretString::from(hex::encode(key));
                write_private(path, text.expose_secret().as_bytes()).map_err(io)?;
                Self::from_hex(&text)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A bearer token (64 hex digits) derived from the installation's key and `context`: the same context
    /// always gives the same token, so a token can be handed out again (a re-sent upgrade event after a
    /// reconnect or a restart) while only its hash is stored; without the key it cannot be guessed.
    #[must_use]
    pub fn derive_token(&self, context: &str) -> String {
        let mut mac = self.tokens.clone();
        mac.update(context.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Seals `plain` for the row identified by `row`.
    #[must_use]
    pub fn seal(&self, row: &str, plain: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: row.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a value sealed for `row`.
    ///
    /// # Errors
    /// [`SecretsError::Open`] when the value was sealed under another key or row, or was altered.
    pub fn open(&self, row: &str, sealed: &[u8]) -> Result<SecretString, SecretsError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(SecretsError::Open);
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: row.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Open)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| SecretsError::Open)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let a = Sealer::load_or_create(&dir.path().join("k")).unwrap();
        let sealed = a.seal("dev-1", "s3cret-value");
        assert!(
            !sealed.windows(6).any(|w| w == b"s3cret"),
            "ciphertext must not contain the secret"
        );
        assert_eq!(
            a.open("dev-1", &sealed).unwrap().expose_secret(),
            "s3cret-value"
        );
        assert!(a.open("dev-2", &sealed).is_err());

        let again = Sealer::load_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(
            again.open("dev-1", &sealed).unwrap().expose_secret(),
            "s3cret-value"
        );

        let other = Sealer::load_or_create(&dir.path().join("other")).unwrap();
        assert!(other.open("dev-1", &sealed).is_err());

        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(a.open("dev-1", &tampered).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        Sealer::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(Sealer::from_hex(&SecretString::from("abcd")).is_err());
        assert!(Sealer::from_hex(&SecretString::from("zz".repeat(32))).is_err());
        assert!(Sealer::from_hex(&SecretString::from("00".repeat(32))).is_ok());
    }
}
