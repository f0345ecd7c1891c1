//! Packages: the two kinds IoTDA upgrades.

use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::device::wire_enum;

wire_enum!(
    /// What a package upgrades (`package_type`).
    PackageType, "package_type" {
        /// Application software (SOTA; PCP for LwM2M devices).
        Software = "softwarePackage",
        /// Firmware (FOTA; Object 5 for LwM2M devices).
        Firmware = "firmwarePackage",
    }
);

/// The PCP segment size bounds (bytes) and default.
pub const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u16> = 32..=500;
/// The PCP segment size used when none is given.
pub const DEFAULT_SEGMENT_SIZE: u16 = 500;

/// The most source versions a package may list (IoTDA's limit).
pub const MAX_SOURCE_VERSIONS: usize = 20;

/// A package's descriptive metadata, validated: what an upload or a bucket registration supplies besides
/// the bytes. Size and SHA-256 are measured by the store, never taken from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageMeta {
    /// Software or firmware.
    pub package_type: PackageType,
    /// The product the package is for.
    pub product_id: crate::ProductId,
    /// The version a device reports once upgraded.
    pub version: crate::text::Version,
    /// Versions allowed to upgrade to this one; empty means any.
    pub support_source_versions: Vec<crate::text::Version>,
    /// Free text, up to 1024 characters.
    pub description: String,
    /// Sent to devices in the upgrade notification, up to 4096 characters.
    pub custom_info: String,
    /// The name devices see (`Content-Disposition`, `file_name`).
    pub file_name: FileName,
    /// PCP segment size in bytes (32-500).
    pub segment_size: u16,
}

/// Unvalidated package metadata as a form or JSON body gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageMetaInput {
    /// `softwarePackage` or `firmwarePackage`.
    pub package_type: String,
    /// Product id.
    pub product_id: String,
    /// Version.
    pub version: String,
    /// Allowed source versions.
    #[serde(default)]
    pub support_source_versions: Vec<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Custom information for devices.
    #[serde(default)]
    pub custom_info: String,
    /// File name.
    pub file_name: String,
    /// PCP segment size; 500 when absent.
    #[serde(default)]
    pub segment_size: Option<u16>,
}

impl PackageMeta {
    /// Validates every field.
    ///
    /// # Errors
    /// The first [`ValidationError`], naming its field.
    pub fn parse(input: PackageMetaInput) -> Result<Self, ValidationError> {
        let package_type = PackageType::parse(input.package_type.trim())?;
        let product_id = crate::ProductId::parse(input.product_id.trim())?;
        let version = crate::text::Version::parse(input.version.trim())?;
        if input.support_source_versions.len() > MAX_SOURCE_VERSIONS {
            return Err(ValidationError::new(
                "support_source_versions",
                format!("may list at most {MAX_SOURCE_VERSIONS} versions"),
            ));
        }
        let mut sources = Vec::with_capacity(input.support_source_versions.len());
        for v in input.support_source_versions {
            let v = crate::text::Version::parse(v.trim()).map_err(|e| {
                ValidationError::new("support_source_versions", format!("{v:?}: {}", e.message))
            })?;
            if !sources.contains(&v) {
                sources.push(v);
            }
        }
        let segment_size = input.segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE);
        if !SEGMENT_SIZE_RANGE.contains(&segment_size) {
            return Err(ValidationError::new(
                "segment_size",
                "must be 32 to 500 bytes",
            ));
        }
        Ok(Self {
            package_type,
            product_id,
            version,
            support_source_versions: sources,
            description: crate::text::bounded("description", &input.description, 1024, false)?,
            custom_info: crate::text::bounded("custom_info", &input.custom_info, 4096, false)?,
            file_name: FileName::parse(&input.file_name)?,
            segment_size,
        })
    }

    /// Whether a device on `current` may upgrade to this package.
    #[must_use]
    pub fn accepts_source(&self, current: &str) -> bool {
        self.support_source_versions.is_empty()
            || self
                .support_source_versions
                .iter()
                .any(|v| v.as_str() == current)
    }
}

/// A file name safe to put in a `Content-Disposition` header, an object key and a URL: one path segment,
/// 1-255 bytes, no separators, no `.`/`..`, no control characters or quotes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FileName(String);

impl FileName {
    /// Validates a file name.
    ///
    /// # Errors
    /// [`ValidationError`] for `file_name`, e.g. for anything that tries to leave its directory.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let err = |m: &str| Err(ValidationError::new("file_name", m));
        if s.is_empty() || s.len() > 255 {
            return err("must be 1 to 255 bytes");
        }
        if s == "." || s == ".." {
            return err("must not be . or ..");
        }
        if s.chars()
            .any(|c| matches!(c, '/' | '\\' | '"') || c.is_control())
        {
            return err("must not contain '/', '\\', '\"' or control characters");
        }
        if s.trim() != s {
            return err("must not start or end with spaces");
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for FileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for FileName {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<FileName> for String {
    fn from(f: FileName) -> Self {
        f.0
    }
}

/// The key prefix of objects Updraft writes itself; registrations may not point into it.
pub const UPLOAD_PREFIX: &str = "uploads/";

/// An object key below the package store's root, as a bucket registration names it
/// (`file_location.obs_location.object_key`): `/`-separated segments, none empty, `.` or `..`, no `\`,
/// no control characters, at most 1024 bytes, not under [`UPLOAD_PREFIX`]. Such a key can never leave the
/// store's directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validates a key given by a client.
    ///
    /// # Errors
    /// [`ValidationError`] for `object_key`, e.g. for `../secret.key` or `/etc/passwd`.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let err = |m: &str| Err(ValidationError::new("object_key", m));
        if s.is_empty() || s.len() > 1024 {
            return err("must be 1 to 1024 bytes");
        }
        if s.starts_with('/') {
            return err("must be relative to the bucket (no leading '/')");
        }
        if s.chars().any(|c| c == '\\' || c.is_control()) {
            return err("must not contain '\\' or control characters");
        }
        if s.split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return err("must not contain empty, '.' or '..' segments");
        }
        if s.starts_with(UPLOAD_PREFIX) {
            return err("uploads/ is reserved for packages uploaded through Updraft");
        }
        Ok(Self(s.to_owned()))
    }

    /// The key of an uploaded package's object.
    #[must_use]
    pub fn for_upload(package_id: &crate::PackageId) -> Self {
        Self(format!("{UPLOAD_PREFIX}{package_id}"))
    }

    /// The key as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment: the file name a registered object gets when none is given.
    #[must_use]
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl TryFrom<String> for ObjectKey {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ObjectKey> for String {
    fn from(k: ObjectKey) -> Self {
        k.0
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates an S3/OBS bucket name: 3-63 characters of lowercase letters, digits, `-` and `.`.
///
/// # Errors
/// [`ValidationError`] for `bucket_name`.
pub fn parse_bucket_name(s: &str) -> Result<&str, ValidationError> {
    if (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Ok(s)
    } else {
        Err(ValidationError::new(
            "bucket_name",
            "must be 3 to 63 lowercase letters, digits, '-' or '.'",
        ))
    }
}

/// Validates a SHA-256 given as 64 hex digits (the `sign` of a registration) and lower-cases it.
///
/// # Errors
/// [`ValidationError`] for `sign`.
pub fn parse_sha256(s: &str) -> Result<String, ValidationError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(ValidationError::new(
            "sign",
            "must be 64 hexadecimal digits (SHA-256)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PackageMetaInput {
        PackageMetaInput {
            package_type: "softwarePackage".into(),
            product_id: "meter".into(),
            version: "2.0.0".into(),
            support_source_versions: vec!["1.0.0".into(), "1.1.0".into(), "1.0.0".into()],
            file_name: "app-2.0.0.bin".into(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_metadata_parses_with_defaults() {
        let m = PackageMeta::parse(input()).unwrap();
        assert_eq!(m.segment_size, DEFAULT_SEGMENT_SIZE);
        assert_eq!(m.support_source_versions.len(), 2, "duplicates are dropped");
        assert!(m.accepts_source("1.1.0"));
        assert!(!m.accepts_source("0.9.0"));
        let any = PackageMeta::parse(PackageMetaInput {
            support_source_versions: vec![],
            ..input()
        })
        .unwrap();
        assert!(any.accepts_source("anything"));
    }

    #[test]
    fn each_rule_names_its_field() {
        let field = |i: PackageMetaInput| PackageMeta::parse(i).unwrap_err().field;
        assert_eq!(
            field(PackageMetaInput {
                package_type: "modulePackage".into(),
                ..input()
            }),
            "package_type"
        );
        assert_eq!(
            field(PackageMetaInput {
                version: "2 0".into(),
                ..input()
            }),
            "version"
        );
        assert_eq!(
            field(PackageMetaInput {
                segment_size: Some(31),
                ..input()
            }),
            "segment_size"
        );
        assert_eq!(
            field(PackageMetaInput {
                segment_size: Some(501),
                ..input()
            }),
            "segment_size"
        );
        assert_eq!(
            field(PackageMetaInput {
                custom_info: "x".repeat(4097),
                ..input()
            }),
            "custom_info"
        );
        assert_eq!(
            field(PackageMetaInput {
                description: "x".repeat(1025),
                ..input()
            }),
            "description"
        );
        let many = (0..21).map(|i| format!("1.{i}")).collect();
        assert_eq!(
            field(PackageMetaInput {
                support_source_versions: many,
                ..input()
            }),
            "support_source_versions"
        );
        let bad = vec!["1.0 beta".into()];
        assert_eq!(
            field(PackageMetaInput {
                support_source_versions: bad,
                ..input()
            }),
            "support_source_versions"
        );
    }

    #[test]
    fn file_names_cannot_escape_their_directory() {
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "x\"y",
            "line\nbreak",
            " lead",
            &"x".repeat(256),
        ] {
            assert!(FileName::parse(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["app.bin", "firmware v2.0.img", "升级包.bin", "..hidden"] {
            assert!(FileName::parse(good).is_ok(), "{good:?} is fine");
        }
    }

    #[test]
    fn object_keys_cannot_escape_the_store() {
        for bad in [
            "../secret.key",
            "fw/../../etc/passwd",
            "/etc/passwd",
            "fw//v2.bin",
            "fw/./v2.bin",
            "fw\\..\\x",
            "fw/v2.bin/",
            "",
            "uploads/abc",
            "a\u{0}b",
        ] {
            assert_eq!(
                ObjectKey::parse(bad).unwrap_err().field,
                "object_key",
                "{bad:?} must be refused"
            );
        }
        let k = ObjectKey::parse("fw/v2.0/app.bin").unwrap();
        assert_eq!(k.file_name(), "app.bin");
        let id = crate::PackageId::parse("0123456789abcdef01234567").unwrap();
        assert_eq!(
            ObjectKey::for_upload(&id).as_str(),
            "uploads/0123456789abcdef01234567"
        );
    }

    #[test]
    fn bucket_names_and_signs_are_checked() {
        assert!(parse_bucket_name("updraft").is_ok());
        assert!(parse_bucket_name("my.bucket-1").is_ok());
        assert!(parse_bucket_name("UP").is_err());
        assert!(parse_bucket_name("a/b").is_err());
        assert_eq!(parse_sha256(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
    }
}
