//! TLS material for the HTTPS listener (and, later, MQTT over TLS).
//!
//! With operator-provided PEM files those are used as they are. Otherwise Updraft keeps a local CA under
//! `{data_dir}/tls` (generated on first start, ten years) and a server certificate signed by it for
//! `localhost`, `127.0.0.1`, `::1`, this host's name and the configured names. The server certificate is
//! re-issued when the names change or it is within 30 days of expiry; the CA stays, so devices that trust
//! `ca.pem` keep working.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

use crate::config::Settings;

/// Certificate chain and key for the server, and where the CA is (when Updraft made one).
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
    /// The local CA certificate devices and browsers should trust, if Updraft generated the certificate.
    pub ca_path: Option<PathBuf>,
}

/// What the last issued server certificate covers (to know when to re-issue).
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
struct Issued {
    names: Vec<String>,
    not_after_unix: i64,
}

/// Loads or generates the TLS material for `settings`.
///
/// # Errors
/// When provided files cannot be read, or generated ones cannot be written.
pub fn prepare(settings: &Settings, now_unix: i64) -> Result<TlsMaterial> {
    if let (Some(cert), Some(key)) = (&settings.tls.cert, &settings.tls.key) {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("reading tls.cert {}", cert.display()))?;
        let key_pem =
            std::fs::read(key).with_context(|| format!("reading tls.key {}", key.display()))?;
        return Ok(TlsMaterial {
            cert_pem,
            key_pem,
            ca_path: None,
        });
    }
    let dir = settings.data_dir.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = crate::config::hostname() {
        names.push(host);
    }
    names.extend(settings.tls.names.iter().cloned());
    names.sort();
    names.dedup();
    generated(&dir, names, now_unix)
}

const DAY: i64 = 86_400;

fn generated(dir: &Path, names: Vec<String>, now_unix: i64) -> Result<TlsMaterial> {
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    if !ca_cert_path.exists() || !ca_key_path.exists() {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Updraft local CA");
        dn.push(DnType::OrganizationName, "Updraft");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = at(now_unix - DAY);
        params.not_after = at(now_unix + 3650 * DAY);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&ca_cert_path, cert.pem())
            .with_context(|| format!("writing {}", ca_cert_path.display()))?;
        tracing::info!(path = %ca_cert_path.display(), "generated a local certificate authority");
    }

    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let issued_path = dir.join("server.json");
    let issued: Option<Issued> = std::fs::read(&issued_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let fresh = issued.is_some_and(|i| i.names == names && i.not_after_unix - now_unix > 30 * DAY);
    if !(fresh && cert_path.exists() && key_path.exists()) {
        let ca_key_pem = std::fs::read_to_string(&ca_key_path).context("reading the CA key")?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing the CA key")?;
        let ca_pem =
            std::fs::read_to_string(&ca_cert_path).context("reading the CA certificate")?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("loading the CA")?;
        let key = KeyPair::generate().context("generating the server key")?;
        let mut params =
            CertificateParams::new(names.clone()).context("server certificate names")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Updraft server");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = now_unix + 397 * DAY; // browsers refuse server certificates valid for longer
        params.not_before = at(now_unix - DAY);
        params.not_after = at(not_after);
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the server certificate")?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        // The chain a client needs: server certificate, then the CA.
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca_pem))
            .context("writing the server certificate")?;
        let record = Issued {
            names: names.clone(),
            not_after_unix: not_after,
        };
        std::fs::write(&issued_path, serde_json::to_vec_pretty(&record)?)
            .context("writing server.json")?;
        tracing::info!(names = ?names, "issued the server certificate");
    }
    Ok(TlsMaterial {
        cert_pem: std::fs::read(&cert_path)?,
        key_pem: std::fs::read(&key_path)?,
        ca_path: Some(ca_cert_path),
    })
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
