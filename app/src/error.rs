//! The one error contract of the console's server functions (and, through `server`, of JSON errors).

use std::collections::BTreeMap;

use leptos::server_fn::codec::JsonEncoding;
use leptos::server_fn::error::{FromServerFnError, ServerFnErrorErr};
use serde::{Deserialize, Serialize};

/// What went wrong, as the browser sees it: a code, a message, and messages per form field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The kind of error.
    pub code: ErrorCode,
    /// A sentence for the operator.
    pub message: String,
    /// Messages per field name, shown next to the field.
    pub fields: BTreeMap<String, String>,
}

/// Error kinds, each with one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 404
    NotFound,
    /// 409
    Conflict,
    /// 422
    Validation,
    /// 401
    Unauthorized,
    /// 403: signed in, but this needs an administrator.
    Forbidden,
    /// 429
    RateLimited,
    /// 500
    Internal,
    /// 503: the server is at a limit; try again shortly.
    Busy,
}

impl ErrorCode {
    /// The HTTP status for this code.
    #[must_use]
    pub const fn status(self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Validation => 422,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::Busy => 503,
        }
    }
}

impl ApiError {
    /// An error without field details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }

    /// Sets the server function's HTTP status to match the code (on the server; a no-op in the browser).
    #[must_use]
    pub fn with_status(self) -> Self {
        #[cfg(feature = "ssr")]
        {
            if let Some(response) = leptos::prelude::use_context::<leptos_axum::ResponseOptions>()
                && let Ok(status) = axum::http::StatusCode::from_u16(self.code.status())
            {
                response.set_status(status);
            }
        }
        self
    }

    /// Renames field keys (`(from, to)`): services name IoTDA's fields, forms have their own names.
    #[must_use]
    pub fn rename_fields(mut self, names: &[(&str, &str)]) -> Self {
        for (from, to) in names {
            if let Some(m) = self.fields.remove(*from) {
                self.fields.insert((*to).to_owned(), m);
            }
        }
        self
    }

    /// The message for `field`, if any.
    #[must_use]
    pub fn field(&self, field: &str) -> Option<String> {
        self.fields.get(field).cloned()
    }
}

impl From<domain::ValidationError> for ApiError {
    fn from(e: domain::ValidationError) -> Self {
        let mut fields = BTreeMap::new();
        fields.insert(e.field.clone(), e.message.clone());
        Self {
            code: ErrorCode::Validation,
            message: e.to_string(),
            fields,
        }
        .with_status()
    }
}

impl FromServerFnError for ApiError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(e: ServerFnErrorErr) -> Self {
        Self::new(ErrorCode::Internal, e.to_string())
    }
}

/// Maps a service error for the browser and sets the server function's HTTP status to match the code
/// (422, 409, 404...), so an error is an error on the wire too, not only in the body.
#[cfg(feature = "ssr")]
impl From<backend::Error> for ApiError {
    fn from(e: backend::Error) -> Self {
        Self::from_service(e).with_status()
    }
}

#[cfg(feature = "ssr")]
impl ApiError {
    fn from_service(e: backend::Error) -> Self {
        use backend::Error as E;
        match e {
            E::Validation(v) => v.into(),
            E::NotFound { .. } => Self::new(ErrorCode::NotFound, e.to_string()),
            E::Conflict(m) => Self::new(ErrorCode::Conflict, m),
            E::Unauthorized(m) => Self::new(ErrorCode::Unauthorized, m),
            E::RateLimited { .. } => Self::new(ErrorCode::RateLimited, e.to_string()),
            E::Busy { .. } => Self::new(ErrorCode::Busy, e.to_string()),
            E::TooLarge { .. } => {
                let mut api = Self::new(ErrorCode::Validation, e.to_string());
                api.fields.insert("file".to_owned(), e.to_string());
                api
            }
            E::Db(_) | E::Secrets(_) | E::Storage(_) | E::Internal(_) => {
                // The cause is logged here, on the server; the browser gets no internals.
                tracing::error!(error.message = %e, error.cause_chain = ?e, "server function failed");
                Self::new(ErrorCode::Internal, "internal error; see the server log")
            }
        }
    }
}
