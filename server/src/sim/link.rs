//! How a simulated LwM2M device reaches the platform: plain CoAP over UDP, or CoAPS (DTLS 1.2 with its
//! pre-shared key, the node id as identity) the way an NB-IoT module does. The DTLS client is OpenSSL's,
//! reading and writing through an in-memory datagram queue so that the socket stays async.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use backend::coap::{Datagrams, application_records, recycle};
use openssl::ssl::{ErrorCode, Ssl, SslContextBuilder, SslMethod, SslStream, SslVersion};
use tokio::net::UdpSocket;

/// The suites IoTDA offers on 5684 (`TLS_PSK_WITH_AES_128_CCM_8`, `TLS_PSK_WITH_AES_128_CBC_SHA256`).
const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CBC-SHA256:@SECLEVEL=0";
/// A handshake is given up after this long (the device tries again later).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A device's way to the platform.
pub(crate) enum Link {
    /// CoAP.
    Plain(UdpSocket),
    /// CoAPS.
    Dtls {
        socket: UdpSocket,
        session: Mutex<Session>,
    },
}

/// A DTLS session's OpenSSL object, and what it may hold unread.
pub(crate) struct Session {
    stream: SslStream<Datagrams>,
    /// Records of application data given to OpenSSL and not read yet; `None`: unknown (something
    /// else came with them), read until OpenSSL has nothing.
    unread: Option<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Link {
    /// A link to `server`: plain, or (with `psk`, identity and key) over a DTLS session offering
    /// `ciphers` (OpenSSL's names; by default the suites IoTDA serves).
    ///
    /// # Errors
    /// The socket, or a handshake that failed or timed out.
    pub(crate) async fn connect(
        server: SocketAddr,
        psk: Option<(&str, &[u8])>,
        ciphers: Option<&str>,
    ) -> Result<Self> {
        let socket = UdpSocket::bind(("127.0.0.1", 0)).await?;
        socket.connect(server).await?;
        let Some((identity, key)) = psk else {
            return Ok(Self::Plain(socket));
        };
        let mut ctx = SslContextBuilder::new(SslMethod::dtls_client())?;
        ctx.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        match ciphers {
            Some(c) => ctx.set_cipher_list(&format!("{c}:@SECLEVEL=0"))?,
            None => ctx.set_cipher_list(CIPHERS)?,
        }
        let (identity, key) = (identity.as_bytes().to_vec(), key.to_vec());
        ctx.set_psk_client_callback(move |_, _hint, id_out, key_out| {
            if identity.len() >= id_out.len() || key.len() > key_out.len() {
                return Ok(0);
            }
            id_out[..identity.len()].copy_from_slice(&identity);
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let mut ssl = Ssl::new(&ctx.build())?;
        ssl.set_mtu(1152)?;
        ssl.set_connect_state();
        let mut stream = SslStream::new(ssl, Datagrams::default())?;
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut buf = vec![0u8; 2048];
        loop {
            let done = match stream.do_handshake() {
                Ok(()) => true,
                Err(e) if e.code() == ErrorCode::WANT_READ => false,
                Err(e) => anyhow::bail!("DTLS handshake failed: {e}"),
            };
            for d in std::mem::take(&mut stream.get_mut().outbox) {
                socket.send(&d).await?;
            }
            if done {
                break;
            }
            // OpenSSL resends its flight when asked again after its timer ran out.
            match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await {
                Ok(r) => stream.get_mut().push(&buf[..r?]),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("DTLS handshake timed out")
                }
                Err(_) => {}
            }
        }
        Ok(Self::Dtls {
            socket,
            session: Mutex::new(Session {
                stream,
                unread: None,
            }),
        })
    }

    /// Sends a CoAP message.
    pub(crate) async fn send(&self, message: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(socket) => socket.send(message).await.map(drop),
            Self::Dtls { socket, session } => {
                lock(session)
                    .stream
                    .ssl_write(message)
                    .map_err(io::Error::other)?;
                // One datagram at a time, in order (a write makes one, usually): no list to allocate.
                loop {
                    let next = {
                        let mut session = lock(session);
                        let outbox = &mut session.stream.get_mut().outbox;
                        (!outbox.is_empty()).then(|| outbox.remove(0))
                    };
                    let Some(d) = next else { return Ok(()) };
                    let sent = socket.send(&d).await;
                    recycle(d);
                    sent?;
                }
            }
        }
    }

    /// Receives a CoAP message into `buf`; its length. Cancel-safe (awaits only the socket).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(socket) => socket.recv(buf).await,
            Self::Dtls { socket, session } => {
                let mut raw = [0u8; 2048];
                loop {
                    {
                        let mut session = lock(session);
                        if session.unread != Some(0) {
                            match session.stream.ssl_read(buf) {
                                Ok(n) => {
                                    if let Some(unread) = &mut session.unread {
                                        *unread -= 1;
                                    }
                                    return Ok(n);
                                }
                                Err(e) if e.code() == ErrorCode::WANT_READ => {
                                    session.unread = Some(0);
                                }
                                Err(e) => return Err(io::Error::other(e.to_string())),
                            }
                        }
                    }
                    let n = socket.recv(&mut raw).await?;
                    let mut session = lock(session);
                    session.stream.get_mut().push(&raw[..n]);
                    session.unread = application_records(&raw[..n]);
                }
            }
        }
    }
}
