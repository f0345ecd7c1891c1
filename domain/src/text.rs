//! Validated free text: names, descriptions and versions.

use crate::ValidationError;

/// Checks a free-text field: trimmed, at most `max` characters, no control characters.
/// `required` forbids the empty string.
///
/// # Errors
/// [`ValidationError`] naming `field`.
pub fn bounded(
    field: &str,
    s: &str,
    max: usize,
    required: bool,
) -> Result<String, ValidationError> {
    let s = s.trim();
    if required && s.is_empty() {
        return Err(ValidationError::new(field, "is required"));
    }
    if s.chars().count() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(s.to_owned())
}

/// A software or firmware version string: 1-256 characters of `[A-Za-z0-9_.-]` (IoTDA's rule).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version(String);

impl Version {
    /// Validates a version.
    ///
    /// # Errors
    /// [`ValidationError`] for `version` when empty, longer than 256 or with other characters.
    pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
        let s = s.into();
        if s.is_empty() {
            return Err(ValidationError::new("version", "must not be empty"));
        }
        if s.len() > 256 {
            return Err(ValidationError::new(
                "version",
                "must be at most 256 characters",
            ));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(ValidationError::new(
                "version",
                "may contain only letters, digits, '_', '.' and '-'",
            ));
        }
        Ok(Self(s))
    }

    /// The version as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Version {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Version> for String {
    fn from(v: Version) -> Self {
        v.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_is_trimmed_and_limited() {
        assert_eq!(bounded("name", "  pump  ", 8, true).unwrap(), "pump");
        assert!(bounded("name", "   ", 8, true).is_err());
        assert_eq!(bounded("name", "", 8, false).unwrap(), "");
        assert!(bounded("name", "ninechars", 8, true).is_err());
        assert!(bounded("name", "a\u{0}b", 8, true).is_err());
        assert_eq!(bounded("name", "水泵", 2, true).unwrap(), "水泵");
    }

    #[test]
    fn versions_follow_iotda_syntax() {
        assert!(Version::parse("V1.0.3_rc-2").is_ok());
        assert!(Version::parse("1 0").is_err());
        assert!(Version::parse("").is_err());
        assert!(Version::parse("9".repeat(257)).is_err());
    }
}
