//! IoTDA's paging, shared by every `/v5` list: `limit` 1-50 (default 10), `offset` 0-500, and a `marker`,
//! the id of the previous page's last record (records come by descending id). Ids that are 24 hex digits
//! (packages, tasks, subscriptions) are checked as such; other ids (devices, groups, products) by
//! [`id_paging`].

use backend::service::{ListOrder, Page};
use serde::Serialize;
use utoipa::ToSchema;

use super::iotda::IotdaError;

/// IoTDA's `page` (`PageInfo`; `Page` elsewhere, the same shape).
#[derive(Serialize, ToSchema)]
pub(crate) struct PageInfo {
    /// Every matching record, across pages.
    pub(crate) count: u64,
    /// The id of this page's last record: the next page's `marker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) marker: Option<String>,
}

/// Parses IoTDA's `limit` (1-50, default 10), `offset` (0-500, default 0) and `marker` (24 hex digits).
pub(crate) fn paging(
    limit: Option<&str>,
    offset: Option<&str>,
    marker: Option<&str>,
) -> Result<(Page, Option<String>), IotdaError> {
    let number =
        |name: &str,
         v: Option<&str>,
         default: u64,
         range: std::ops::RangeInclusive<u64>,
         error: fn(String) -> IotdaError| match v.map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| {
                    error(format!(
                        "{name}: must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ))
                }),
        };
    // IoTDA has its own code for a `limit` out of range.
    let limit = number("limit", limit, 10, 1..=50, IotdaError::bad_limit)?;
    let offset = number("offset", offset, 0, 0..=500, IotdaError::bad_request)?;
    let marker = match marker.map(str::trim).filter(|m| !m.is_empty()) {
        None => None,
        Some(m) if m.len() == 24 && m.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(m.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(IotdaError::bad_request(
                "marker: must be 24 hexadecimal digits (the id of the last record of the previous page)",
            ));
        }
    };
    Ok((Page::new(limit, offset), marker))
}

/// IoTDA's default `marker`: start from the newest record.
const DEFAULT_MARKER: &str = "ffffffffffffffffffffffff";

/// IoTDA paging for ids that are not 24 hex digits: `limit` 1-50, `offset` 0-500, `marker` an id.
pub(super) fn id_paging(
    limit: Option<&str>,
    offset: Option<&str>,
    marker: Option<&str>,
    max_marker: usize,
) -> Result<(Page, ListOrder), IotdaError> {
    let (page, _) = paging(limit, offset, None)?;
    // IoTDA's documented default marker means "from the start".
    let marker = match marker
        .map(str::trim)
        .filter(|m| !m.is_empty() && !m.eq_ignore_ascii_case(DEFAULT_MARKER))
    {
        None => None,
        Some(m)
            if m.len() <= max_marker
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Some(m.to_owned())
        }
        Some(_) => {
            return Err(IotdaError::bad_request(
                "marker: must be the id of the last record of the previous page",
            ));
        }
    };
    Ok((page, ListOrder::ById { marker }))
}
