//! `GET /download/{package_id}/{file_name}`: devices download packages with `Authorization: Bearer
//! <token>` (also `Authorization:Bearer <token>`, as Huawei's C SDK writes it).
//!
//! `GET /fw/{token}`: the HTTPS Package URI of an LwM2M firmware upgrade (`/5/0/1`). LwM2M clients send
//! no headers of ours, so the token is the path; it opens the package it was issued for.
//!
//! Responses have an exact `Content-Length` (never chunked, never compressed: this route sits outside the
//! compression and timeout layers), `Content-Type: application/octet-stream`, `Content-Disposition`,
//! a strong `ETag` (the SHA-256) and `Accept-Ranges: bytes`. One `Range` gives 206, so an interrupted
//! download resumes; several ranges are answered with the whole file (RFC 9110 allows ignoring them).
//!
//! Bytes are streamed from the store. Memory stays bounded under load: all downloads share a read budget
//! of 8 MiB. Every chunk read from the store counts against it from the start of its read (a chunk read
//! ahead included) until hyper has written it (and dropped it), so chunks stuck behind a stalled device
//! are accounted for: a download reads up to 256 KiB at a time (reading the next chunk while one is sent)
//! while the budget has room and few downloads run, and 4 KiB without reading ahead when it is spent or a
//! thousand run. Hyper queues at most one chunk per connection and rustls holds one read's worth of
//! records ([`Transfers::tls_send_buffer`]); a crowd waiting to be authorized waits in [`admit`], before
//! any other layer builds its state for it. A stalled download costs a few tens of KiB.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use backend::AppState;
use backend::objects::ObjectReader;
use backend::service::downloads::{self, Denied};
use backend::service::packages;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use http_body::{Frame, SizeHint};

use super::ServerState;
use super::iotda::IotdaError;

/// Bytes that all running downloads together may hold in chunks read but not yet sent, beyond the
/// smallest chunk each.
const READ_BUDGET: usize = 8 * 1024 * 1024;
/// Above this many running downloads, none reads ahead.
const READ_AHEAD_MAX_ACTIVE: usize = 64;
/// The smallest and largest read per download.
const MIN_CHUNK: usize = 4 * 1024;
const MAX_CHUNK: usize = 256 * 1024;

/// Requests authorized and opened at once. A crowd of devices asking at the same moment waits here
/// (a few hundred bytes each) instead of each holding a database query in flight (~14 KiB each), which
/// would only queue for the connection pool anyway.
const ADMISSIONS: usize = 8;

/// Running downloads, shared by all of them to size their reads.
#[derive(Debug)]
pub struct Transfers {
    active: AtomicUsize,
    /// Bytes in chunks read from the store and not yet dropped by the connection.
    in_flight: Arc<AtomicUsize>,
    /// Downloads being authorized and opened.
    admissions: tokio::sync::Semaphore,
}

impl Default for Transfers {
    fn default() -> Self {
        Self {
            active: AtomicUsize::new(0),
            in_flight: Arc::default(),
            admissions: tokio::sync::Semaphore::new(ADMISSIONS),
        }
    }
}

impl Transfers {
    /// Downloads currently streaming.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Bytes read from the store and still queued for sending, across all downloads.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The next read's size: a fair share of the budget's free part, within 4-256 KiB, a power of two.
    /// The share is half the budget over the active downloads, leaving room for the read-ahead of few
    /// fast downloads (16 get 256 KiB each) and keeping a crowd of slow ones small (1 000 get 4 KiB).
    fn chunk(&self) -> usize {
        let fair = READ_BUDGET / 2 / self.active().max(1);
        let free = READ_BUDGET.saturating_sub(self.in_flight());
        // A power of two: read buffers are recycled in power-of-two sizes.
        let size = fair.min(free).clamp(MIN_CHUNK, MAX_CHUNK);
        1 << size.ilog2()
    }

    /// How much encrypted data a TLS connection may hold that its socket has not taken yet: one read's
    /// worth, at most rustls' default of 64 KiB. A few fast downloads write four 16 KiB records per
    /// system call; a stalled one in a crowd of a thousand holds 4 KiB (the kernel's socket buffer keeps
    /// a fast link busy either way).
    #[must_use]
    pub fn tls_send_buffer(&self) -> usize {
        self.chunk().min(64 * 1024)
    }
}

/// The outermost middleware: a download request waits here for one of the [`ADMISSIONS`] before any
/// other layer or the handler builds its state for it (about 15 KiB per request, which a crowd of a
/// thousand devices would otherwise hold while queueing). The permit is held until the response head is
/// ready: authorizing and opening are admitted, streaming the body is not.
pub(super) async fn admit(
    State(transfers): State<Arc<Transfers>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if !(path.starts_with("/download/") || path.starts_with("/fw/")) {
        return next.run(request).await;
    }
    // Never closed, so acquiring only waits.
    let _admitted = transfers.admissions.acquire().await;
    next.run(request).await
}

/// The handler: every refusal is an IoTDA-style JSON error and nothing else.
pub(super) async fn download(
    State(state): State<ServerState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let response = match serve(&state, &uri, &headers).await {
        Ok(response) => response,
        Err((e, extra)) => {
            let status = e.status;
            let mut response = e.into_response();
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            if let Some((name, value)) = extra {
                response.headers_mut().insert(name, value);
            }
            response
        }
    };
    state
        .app
        .metrics
        .download_responses
        .get_or_create(&backend::metrics::CodeLabels {
            code: response.status().as_u16(),
        })
        .inc();
    response
}

type Refusal = (IotdaError, Option<(header::HeaderName, HeaderValue)>);

fn refuse(e: impl Into<IotdaError>) -> Refusal {
    (e.into(), None)
}

async fn serve(state: &ServerState, uri: &Uri, headers: &HeaderMap) -> Result<Response, Refusal> {
    let grant = if let Some(token) = uri.path().strip_prefix("/fw/") {
        match downloads::authorize_token(&state.app, token)
            .await
            .map_err(refuse)?
        {
            Ok(grant) => grant,
            Err(d) => return Err(refuse(denied(d))),
        }
    } else {
        let (package_id, file_name) = parse_path(uri.path()).map_err(refuse)?;
        let token = bearer(headers).map_err(|d| refuse(denied(d)))?;
        let grant = match downloads::authorize(&state.app, token, &package_id)
            .await
            .map_err(refuse)?
        {
            Ok(grant) => grant,
            Err(d) => return Err(refuse(denied(d))),
        };
        if grant.package.file_name != file_name {
            return Err(refuse(IotdaError::not_found(format!(
                "package {package_id} has no file named {file_name:?}"
            ))));
        }
        grant
    };
    let package = &grant.package;
    let package_id = &package.id;
    let size = u64::try_from(package.size).unwrap_or(0);
    let etag = format!("\"{}\"", package.sha256);
    let range = requested_range(headers, size, &etag).map_err(|e| {
        let value = HeaderValue::from_str(&format!("bytes */{size}")).ok();
        (e, value.map(|v| (header::CONTENT_RANGE, v)))
    })?;
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };

    let key = packages::object_key(package).map_err(refuse)?;
    state.transfers.active.fetch_add(1, Ordering::Relaxed);
    let guard = ActiveGuard(state.transfers.clone());
    let mut reader = match state
        .app
        .store
        .open_range(&key, start..start + len, state.transfers.chunk())
        .await
    {
        Ok(r) => r,
        Err(backend::Error::NotFound { .. }) => {
            tracing::error!(package_id = %package_id, key = %key, "a package's object is missing from the store");
            return Err(refuse(IotdaError::not_found(format!(
                "the file of package {package_id} is missing from the package store"
            ))));
        }
        Err(e) => return Err(refuse(e)),
    };
    reader.track(state.transfers.in_flight.clone());
    let body = DownloadBody {
        reader,
        remaining: len,
        served: 0,
        guard,
        app: state.app.clone(),
        token_hash: grant.token_hash,
    };
    let mut response = Response::new(axum::body::Body::new(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&package.file_name)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    tracing::debug!(package_id = %package_id, device_id = %grant.device_id, subtask_id = grant.subtask_id, start, len, "download");
    Ok(response)
}

fn denied(d: Denied) -> IotdaError {
    match d {
        Denied::Foreign => IotdaError::forbidden(d.to_string()),
        _ => IotdaError::unauthorized(d.to_string()),
    }
}

/// `/download/{package_id}/{file_name}` → both, percent-decoded. Any `.`/`..` segment or encoded separator
/// is refused with 400 before anything else happens.
fn parse_path(path: &str) -> Result<(String, String), IotdaError> {
    let not_found = || {
        IotdaError::not_found(
            "no such download; download URLs look like /download/{package_id}/{file_name}",
        )
    };
    let rest = path.strip_prefix("/download/").ok_or_else(not_found)?;
    let mut segments = Vec::new();
    for raw in rest.split('/') {
        let seg = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| IotdaError::bad_request("the download path is not valid UTF-8"))?;
        if seg == "." || seg == ".." || seg.contains(['/', '\\', '\0']) {
            return Err(IotdaError::bad_request(
                "path traversal is not allowed in download paths",
            ));
        }
        segments.push(seg.into_owned());
    }
    match <[String; 2]>::try_from(segments) {
        Ok([id, name]) if !id.is_empty() && !name.is_empty() => Ok((id, name)),
        _ => Err(not_found()),
    }
}

/// The token of `Authorization: Bearer <token>`; `Ok(None)` without the header.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Denied> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| Denied::Malformed)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(Denied::Malformed)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Some(token.trim()))
    } else {
        Err(Denied::Malformed)
    }
}

/// The single byte range asked for, inclusive; `None` for the whole file (no `Range`, a stale
/// `If-Range`, or several ranges).
fn requested_range(
    headers: &HeaderMap,
    size: u64,
    etag: &str,
) -> Result<Option<(u64, u64)>, IotdaError> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && if_range.as_bytes() != etag.as_bytes()
    {
        return Ok(None);
    }
    let unsatisfiable = |why: &dyn std::fmt::Display| {
        IotdaError::range_not_satisfiable(format!(
            "Range {:?} cannot be served for a {size}-byte file: {why}",
            String::from_utf8_lossy(value.as_bytes())
        ))
    };
    let text = value.to_str().map_err(|_| unsatisfiable(&"not ASCII"))?;
    let ranges = http_range_header::parse_range_header(text)
        .and_then(|r| r.validate(size))
        .map_err(|e| unsatisfiable(&e))?;
    match ranges.as_slice() {
        [r] if size > 0 => Ok(Some((*r.start(), *r.end()))),
        [_] => Err(unsatisfiable(&"the file is empty")),
        _ => Ok(None),
    }
}

/// `attachment; filename=name` (the bare form Huawei's C SDK parses) when the name is a token, otherwise a
/// quoted ASCII fallback plus RFC 8187 `filename*`.
fn content_disposition(name: &str) -> String {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.chars().all(token) {
        return format!("attachment; filename={name}");
    }
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Counts a running download for as long as its body lives.
struct ActiveGuard(Arc<Transfers>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The response body: exactly `remaining` bytes from the store, counted for the token when dropped
/// (finished or interrupted).
struct DownloadBody {
    reader: ObjectReader,
    remaining: u64,
    served: u64,
    guard: ActiveGuard,
    app: AppState,
    token_hash: String,
}

impl http_body::Body for DownloadBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let transfers = &self.guard.0;
        // Reading ahead keeps a few fast transfers busy; with a crowd it only doubles what waits.
        let read_ahead =
            transfers.active() <= READ_AHEAD_MAX_ACTIVE && transfers.in_flight() < READ_BUDGET / 2;
        let chunk = transfers.chunk();
        self.reader.set_chunk(chunk);
        self.reader.set_read_ahead(read_ahead);
        match std::task::ready!(self.reader.poll_next_unpin(cx)) {
            Some(Ok(mut bytes)) => {
                if bytes.len() as u64 > self.remaining {
                    bytes.truncate(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                }
                self.remaining -= bytes.len() as u64;
                self.served += bytes.len() as u64;
                self.app.metrics.download_bytes.inc_by(bytes.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Some(Err(e)) => {
                tracing::error!(error.message = %e, "reading a package for download failed");
                Poll::Ready(Some(Err(e)))
            }
            None => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stored package is shorter than recorded",
            )))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

impl Drop for DownloadBody {
    fn drop(&mut self) {
        if self.served == 0 {
            return;
        }
        let (app, hash, served) = (
            self.app.clone(),
            std::mem::take(&mut self.token_hash),
            self.served,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = downloads::record_served(&app, &hash, served).await {
                    tracing::warn!(error.message = %e, "recording bytes served failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_large_for_a_few_downloads_and_small_for_a_crowd() {
        let t = Transfers::default();
        let with = |n: usize| {
            t.active.store(n, Ordering::Relaxed);
            t.chunk()
        };
        assert_eq!(with(1), MAX_CHUNK);
        assert_eq!(
            with(16),
            MAX_CHUNK,
            "the throughput case keeps 256 KiB reads"
        );
        assert_eq!(with(100), 32 * 1024);
        assert_eq!(with(1000), MIN_CHUNK);
        assert_eq!(
            t.tls_send_buffer(),
            MIN_CHUNK,
            "a crowd's connections hold one small record each"
        );
        with(16);
        assert_eq!(
            t.tls_send_buffer(),
            64 * 1024,
            "a few fast connections write four full records at a time"
        );
        t.active.store(1, Ordering::Relaxed);
        t.in_flight.store(READ_BUDGET, Ordering::Relaxed);
        assert_eq!(
            t.chunk(),
            MIN_CHUNK,
            "a spent budget leaves the smallest read"
        );
    }

    #[test]
    fn paths_are_split_decoded_and_traversal_is_refused() {
        assert_eq!(
            parse_path("/download/abc/fw%20v2.bin").unwrap(),
            ("abc".to_owned(), "fw v2.bin".to_owned())
        );
        for bad in [
            "/download/../secret.key",
            "/download/abc/..",
            "/download/abc/%2e%2e",
            "/download/abc/a%2fb",
            "/download/abc/a%5cb",
            "/download/%2E%2E/x",
        ] {
            assert_eq!(
                parse_path(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        for missing in [
            "/download/abc",
            "/download/abc/x/y",
            "/download//x",
            "/download/abc/",
        ] {
            assert_eq!(
                parse_path(missing).unwrap_err().status,
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
    }

    #[test]
    fn bearer_tokens_are_read_with_or_without_the_space() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Ok(Some("abc")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer   abc "),
        );
        assert_eq!(bearer(&h), Ok(Some("abc")));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), Err(Denied::Malformed));
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let etag = "\"x\"";
        let range = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            requested_range(&h, 1000, etag)
        };
        assert_eq!(range("bytes=0-99").unwrap(), Some((0, 99)));
        assert_eq!(range("bytes=900-").unwrap(), Some((900, 999)));
        assert_eq!(range("bytes=-100").unwrap(), Some((900, 999)));
        assert_eq!(range("bytes=990-5000").unwrap(), Some((990, 999)));
        assert_eq!(
            range("bytes=0-9,20-29").unwrap(),
            None,
            "several ranges: whole file"
        );
        for bad in [
            "bytes=1000-",
            "bytes=50-10",
            "bytes=abc",
            "items=0-1",
            "bytes=-2000",
        ] {
            assert_eq!(
                range(bad).unwrap_err().status,
                StatusCode::RANGE_NOT_SATISFIABLE,
                "{bad}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-9"));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"old\""));
        assert_eq!(
            requested_range(&h, 1000, etag).unwrap(),
            None,
            "stale If-Range: whole file"
        );
    }

    #[test]
    fn content_disposition_is_bare_for_simple_names() {
        assert_eq!(
            content_disposition("fw-2.0.bin"),
            "attachment; filename=fw-2.0.bin"
        );
        assert_eq!(
            content_disposition("fw v2 é.bin"),
            "attachment; filename=\"fw v2 _.bin\"; filename*=UTF-8''fw%20v2%20%C3%A9%2Ebin"
        );
    }
}
