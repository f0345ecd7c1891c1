//! Identifier newtypes. Each follows the syntax IoTDA documents for it, so an id that passes `parse`
//! is safe in a URL path, a topic name and a log line.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Which characters an identifier may contain.
#[derive(Clone, Copy, Debug)]
enum Charset {
    /// `[A-Za-z0-9_-]`
    Word,
    /// `[A-Za-z0-9-]`
    AlnumDash,
    /// `[0-9a-f]`
    LowerHex,
    /// `[0-9a-fA-F-]`
    HexDash,
}

impl Charset {
    fn allows(self, c: char) -> bool {
        match self {
            Self::Word => c.is_ascii_alphanumeric() || c == '_' || c == '-',
            Self::AlnumDash => c.is_ascii_alphanumeric() || c == '-',
            Self::LowerHex => c.is_ascii_digit() || ('a'..='f').contains(&c),
            Self::HexDash => c.is_ascii_hexdigit() || c == '-',
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Word => "letters, digits, '_' and '-'",
            Self::AlnumDash => "letters, digits and '-'",
            Self::LowerHex => "lowercase hexadecimal digits",
            Self::HexDash => "hexadecimal digits and '-'",
        }
    }
}

fn check(field: &str, s: &str, max: usize, charset: Charset) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if !s.chars().all(|c| charset.allows(c)) {
        return Err(ValidationError::new(
            field,
            format!("may contain only {}", charset.describe()),
        ));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:literal, $charset:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest accepted id.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` as this kind of id.
            ///
            /// # Errors
            /// [`ValidationError`] naming the field when `s` is empty, too long or has a forbidden character.
            pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                check($field, &s, $max, $charset)?;
                Ok(Self(s))
            }

            /// The id as text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

string_id!(
    /// A tenant (`project_id` in API paths). Updraft generates 32 lowercase hex digits.
    ProjectId, "project_id", 64, Charset::Word
);
string_id!(
    /// A resource space inside a project (IoTDA "application", `app_id`).
    AppId, "app_id", 36, Charset::Word
);
string_id!(
    /// A product (device model).
    ProductId, "product_id", 36, Charset::Word
);
string_id!(
    /// A device; by default `{product_id}_{node_id}`.
    DeviceId, "device_id", 128, Charset::Word
);
string_id!(
    /// A device group (UUID form).
    GroupId, "group_id", 36, Charset::HexDash
);
string_id!(
    /// An uploaded software or firmware package. Updraft generates 24 lowercase hex digits.
    PackageId, "package_id", 36, Charset::AlnumDash
);
string_id!(
    /// A batch task. Updraft generates 24 lowercase hex digits, time-ordered like IoTDA's.
    TaskId, "task_id", 24, Charset::LowerHex
);
string_id!(
    /// A console user.
    UserId, "user_id", 24, Charset::LowerHex
);

impl DeviceId {
    /// The id IoTDA assigns when none is given: `{product_id}_{node_id}`.
    ///
    /// # Errors
    /// [`ValidationError`] when the result would be longer than [`DeviceId::MAX_LEN`].
    pub fn derived(
        product: &ProductId,
        node: &crate::device::NodeId,
    ) -> Result<Self, ValidationError> {
        Self::parse(format!("{product}_{node}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_their_charset_and_reject_others() {
        assert!(DeviceId::parse("prod_123-abc").is_ok());
        assert!(DeviceId::parse("dev/1").is_err());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("x".repeat(129)).is_err());
        assert!(TaskId::parse("0123456789abcdef01234567").is_ok());
        assert!(TaskId::parse("0123456789ABCDEF01234567").is_err());
        assert!(TaskId::parse("0123456789abcdef012345678").is_err());
        assert!(GroupId::parse("e495cf17-ff79-4294-8f64-4d367919d665").is_ok());
        assert!(GroupId::parse("not-a-group").is_err());
        assert!(PackageId::parse("32822e5744a45ede319d2c50").is_ok());
        assert!(PackageId::parse("a_b").is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let e = ProductId::parse("a b").unwrap_err();
        assert_eq!(e.field, "product_id");
        assert!(e.message.contains("letters, digits"), "{e}");
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let ok: DeviceId = serde_json_like("\"abc\"").unwrap();
        assert_eq!(ok.as_str(), "abc");
        assert!(serde_json_like::<DeviceId>("\"a b\"").is_err());
    }

    /// A tiny JSON string reader so `domain` needs no serde_json dependency for one test.
    fn serde_json_like<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, String> {
        use serde::de::IntoDeserializer;
        let inner = s.trim_matches('"').to_owned();
        let de: serde::de::value::StringDeserializer<serde::de::value::Error> =
            inner.into_deserializer();
        T::deserialize(de).map_err(|e| e.to_string())
    }
}
