//! Accepting HTTPS connections: the connection cap, and the TLS streams that bound their unsent data by
//! the download load.
//!
//! At most `http.max_connections` connections are served at once (the descriptor budget's share, see
//! [`crate::budget`]). A connection beyond that still completes its TLS handshake, but every request on it
//! is answered `503 Service Unavailable` with `Retry-After` and `Connection: close` (IoTDA's error shape,
//! `UPDRAFT.000503`), and it is closed after [`REFUSAL_TIMEOUT`] in any case: a device told "busy" retries
//! later instead of counting a failure. At most [`crate::budget::REFUSING`] connections are being refused
//! at once; past that, new connections are closed as soon as they are accepted, so no crowd can take the
//! descriptors the served connections need.
//!
//! **Slow clients.** The TLS handshake must end within `http.handshake_timeout`; then the first byte of
//! a request must arrive within `http.header_timeout` (hyper's protocol detection would otherwise wait
//! for it for ever), and every request head, the first and each on a kept-alive connection, must be
//! complete within `http.header_timeout` after the connection starts waiting for it (hyper's header
//! read timeout). Trickling a request head or idling between requests therefore ends the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{self, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use futures::future::{Either, Ready};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::Transfers;
use crate::http::iotda::IotdaError;

/// How long a refused connection may stay open.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// What refused requests are told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The HTTPS connection cap.
#[derive(Debug)]
pub struct ConnectionGate {
    serving: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
}

impl ConnectionGate {
    /// A gate serving `max` connections at once and refusing `refusing` more at once.
    #[must_use]
    pub fn new(max: usize, refusing: usize) -> Self {
        Self {
            serving: Arc::new(Semaphore::new(max.max(1))),
            refusing: Arc::new(Semaphore::new(refusing.max(1))),
        }
    }
}

/// The rustls acceptor behind the connection gate; its connections bound their unsent TLS data by the
/// download load ([`Transfers::tls_send_buffer`]).
#[derive(Clone, Debug)]
pub struct GatedTls<A> {
    /// The TLS acceptor.
    pub accept: A,
    /// The download load.
    pub transfers: Arc<Transfers>,
    /// The cap.
    pub gate: Arc<ConnectionGate>,
    /// How long after the handshake the first byte of a request may take.
    pub first_byte_timeout: Duration,
}

/// A connection's place under the cap.
enum Admission {
    Serve(OwnedSemaphorePermit),
    Refuse(OwnedSemaphorePermit),
}

impl<A, S> axum_server::accept::Accept<tokio::net::TcpStream, S> for GatedTls<A>
where
    A: axum_server::accept::Accept<tokio::net::TcpStream, S, Stream = TlsStream>,
    A::Future: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = LoadBoundedStream;
    type Service = Gate<A::Service>;
    type Future =
        futures::future::BoxFuture<'static, std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let admission = match self.gate.serving.clone().try_acquire_owned() {
            Ok(p) => Admission::Serve(p),
            Err(_) => {
                match self.gate.refusing.clone().try_acquire_owned() {
                    Ok(p) => Admission::Refuse(p),
                    Err(_) => {
                        // Past the cap and past the refusals in progress: close at once.
                        drop(stream);
                        return Box::pin(async {
                            Err(std::io::Error::other("HTTPS connection cap reached"))
                        });
                    }
                }
            }
        };
        let accepting = self.accept.accept(stream, service);
        let transfers = self.transfers.clone();
        let first_byte_timeout = self.first_byte_timeout;
        Box::pin(async move {
            let (tls, service, permit, deadline) = match admission {
                Admission::Serve(permit) => {
                    let (tls, service) = accepting.await?;
                    (tls, Gate::Open(service), permit, None)
                }
                Admission::Refuse(permit) => {
                    let (tls, _) = tokio::time::timeout(REFUSAL_TIMEOUT, accepting)
                        .await
                        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
                    let deadline = Box::pin(tokio::time::sleep(REFUSAL_TIMEOUT));
                    (tls, Gate::Busy, permit, Some(deadline))
                }
            };
            Ok((
                LoadBoundedStream {
                    tls,
                    transfers,
                    _permit: permit,
                    deadline,
                    first_byte: Some(Box::pin(tokio::time::sleep(first_byte_timeout))),
                },
                service,
            ))
        })
    }
}

/// The service of one connection: the application, or "busy" for a connection past the cap.
#[derive(Clone, Debug)]
pub enum Gate<S> {
    /// Under the cap.
    Open(S),
    /// Past the cap: every request gets 503.
    Busy,
}

impl<S> tower::Service<Request<Incoming>> for Gate<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::Open(s) => s.poll_ready(cx),
            Self::Busy => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        match self {
            Self::Open(s) => Either::Left(s.call(req)),
            Self::Busy => Either::Right(futures::future::ready(Ok(busy()))),
        }
    }
}

/// The answer to every request on a connection past the cap.
fn busy() -> Response<Body> {
    let mut response = IotdaError::busy(
        "the server is at its connection limit (http.max_connections); try again shortly",
        RETRY_AFTER,
    )
    .into_response();
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A TLS connection that sets its send-buffer bound (a field store) before every write, holds its place
/// under the cap while it lives, ends when no request byte comes in time, and (when refused) ends at its
/// deadline.
pub struct LoadBoundedStream {
    tls: TlsStream,
    transfers: Arc<Transfers>,
    _permit: OwnedSemaphorePermit,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Until the first byte of a request arrives: when the connection gives up waiting for it.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl LoadBoundedStream {
    fn bounded(&mut self) -> Pin<&mut TlsStream> {
        let limit = self.transfers.tls_send_buffer();
        self.tls.get_mut().1.set_buffer_limit(Some(limit));
        Pin::new(&mut self.tls)
    }

    /// Whether a refused connection's time is up.
    fn expired(&mut self, cx: &mut task::Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "refused connection timed out")
}

impl AsyncRead for LoadBoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.tls).poll_read(cx, buf);
        if self.first_byte.is_some() {
            if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.first_byte = None;
            } else if read.is_pending()
                && self
                    .first_byte
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within http.header_timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for LoadBoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        self.bounded().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        self.bounded().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
