//! Which DTLS library serves Updraft's CoAPS port: OpenSSL (Debian's libssl through rust-openssl) or
//! dimpl (pure Rust, sans-IO, the one pure-Rust DTLS 1.2 stack with `TLS_PSK_WITH_AES_128_CCM_8` whose
//! design fits a server of many sessions on one socket). Each plays the server against an OpenSSL
//! client (an independent implementation), all in memory on one thread, so that the time measured is
//! the server's own CPU:
//!
//! 1. **Interop**: the handshake with the suites IoTDA serves, with and without the Extended Master
//!    Secret extension (RFC 7627; tinydtls, Wakaama's and libcoap's embedded DTLS, does not send it).
//! 2. **CPU per handshake** (HelloVerifyRequest cookie exchange included), medians of rounds.
//! 3. **CPU per record**: a 40-byte CoAP message received, a 520-byte PCP segment sent.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion,
};

const IDENTITY: &[u8] = b"863705000000001";
const KEY: &[u8] = b"0123456789abcdef";
const CCM8: &str = "PSK-AES128-CCM8";
const CBC: &str = "PSK-AES128-CBC-SHA256";
/// OpenSSL 3's `SSL_OP_NO_EXTENDED_MASTER_SECRET` (rust-openssl has no name for it).
const NO_EMS: u64 = 1;
const ROUNDS: usize = 5;
const HANDSHAKES: usize = 400;
const RECORDS: usize = 20_000;

/// Datagrams in and out of an OpenSSL object: one read is one datagram.
#[derive(Debug, Default)]
struct Datagrams {
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.inbox.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a server does with a datagram: the datagrams to send back, and the application data it carried.
type Received = (Vec<Vec<u8>>, Vec<Vec<u8>>);
/// Makes a new server-side session.
type NewServer<'a> = &'a dyn Fn() -> Box<dyn Server>;

/// The server side of one session.
trait Server {
    /// A datagram from the client: what to send back, and the application data it carried.
    fn receive(&mut self, datagram: &[u8]) -> Result<Received, String>;
    /// Application data to the client: the datagrams to send.
    fn send(&mut self, plain: &[u8]) -> Vec<Vec<u8>>;
    /// Whether the handshake finished.
    fn connected(&self) -> bool;
}

struct OpensslServer {
    stream: SslStream<Datagrams>,
    connected: bool,
}

/// Updraft's server context for `suites`; with `release_buffers`, OpenSSL frees a session's buffers
/// between records (`SSL_MODE_RELEASE_BUFFERS`, as Updraft runs it: idle sessions cost less memory).
fn openssl_server_context(suites: &str, release_buffers: bool) -> SslContext {
    let mut b = SslContextBuilder::new(SslMethod::dtls_server()).expect("context");
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))
        .expect("version");
    b.set_cipher_list(&format!("{suites}:@SECLEVEL=0"))
        .expect("suites");
    b.set_options(SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU);
    if release_buffers {
        b.set_mode(openssl::ssl::SslMode::RELEASE_BUFFERS);
    }
    b.set_cookie_generate_cb(|_, out| {
        out[..16].copy_from_slice(&[7; 16]);
        Ok(16)
    });
    b.set_cookie_verify_cb(|_, c| c == [7; 16]);
    b.set_psk_server_callback(|_, identity, out| {
        if identity == Some(IDENTITY) {
            out[..KEY.len()].copy_from_slice(KEY);
            Ok(KEY.len())
        } else {
            Ok(0)
        }
    });
    b.build()
}

impl OpensslServer {
    fn new(context: &SslContext) -> Self {
        let mut ssl = Ssl::new(context).expect("ssl");
        ssl.set_mtu(1152).expect("mtu");
        ssl.set_accept_state();
        Self {
            stream: SslStream::new(ssl, Datagrams::default()).expect("stream"),
            connected: false,
        }
    }
}

impl Server for OpensslServer {
    fn receive(&mut self, datagram: &[u8]) -> Result<Received, String> {
        self.stream.get_mut().inbox.push_back(datagram.to_vec());
        let mut plain = Vec::new();
        if !self.connected {
            match self.stream.do_handshake() {
                Ok(()) => self.connected = true,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => return Err(e.to_string()),
            }
        } else {
            let mut buf = [0u8; 2048];
            // One record per datagram here: one read (as Updraft does when it knows the count).
            match self.stream.ssl_read(&mut buf) {
                Ok(n) => plain.push(buf[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok((std::mem::take(&mut self.stream.get_mut().outbox), plain))
    }

    fn send(&mut self, plain: &[u8]) -> Vec<Vec<u8>> {
        self.stream.ssl_write(plain).expect("write");
        std::mem::take(&mut self.stream.get_mut().outbox)
    }

    fn connected(&self) -> bool {
        self.connected
    }
}

struct Resolver;

impl dimpl::PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        (identity == IDENTITY).then(|| KEY.to_vec())
    }
}

struct DimplServer {
    dtls: dimpl::Dtls,
    connected: bool,
    buf: Vec<u8>,
}

impl DimplServer {
    fn new(config: &Arc<dimpl::Config>) -> Self {
        let mut dtls = dimpl::Dtls::new_12_psk(config.clone(), Instant::now());
        dtls.set_active(false);
        // Its first timeout sets up the handshake's random (dimpl's server needs it before the hello).
        dtls.handle_timeout(Instant::now()).expect("timer");
        Self {
            dtls,
            connected: false,
            buf: vec![0; 2048],
        }
    }

    fn drain(&mut self, out: &mut Vec<Vec<u8>>, plain: &mut Vec<Vec<u8>>) {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                dimpl::Output::Packet(p) => out.push(p.to_vec()),
                dimpl::Output::ApplicationData(d) => plain.push(d.to_vec()),
                dimpl::Output::Connected => self.connected = true,
                dimpl::Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                dimpl::Output::Timeout(_) => return,
                _ => {}
            }
        }
    }
}

impl Server for DimplServer {
    fn receive(&mut self, datagram: &[u8]) -> Result<Received, String> {
        self.dtls
            .handle_packet(datagram)
            .map_err(|e| e.to_string())?;
        let (mut out, mut plain) = (Vec::new(), Vec::new());
        self.drain(&mut out, &mut plain);
        Ok((out, plain))
    }

    fn send(&mut self, plain: &[u8]) -> Vec<Vec<u8>> {
        self.dtls.send_application_data(plain).expect("write");
        let (mut out, mut ignored) = (Vec::new(), Vec::new());
        self.drain(&mut out, &mut ignored);
        out
    }

    fn connected(&self) -> bool {
        self.connected
    }
}

fn dimpl_config() -> Arc<dimpl::Config> {
    Arc::new(
        dimpl::Config::builder()
            .with_psk_server(None, Arc::new(Resolver))
            .build()
            .expect("dimpl config"),
    )
}

/// An OpenSSL DTLS 1.2 PSK client offering `suites`, with or without Extended Master Secret.
fn client(suites: &str, ems: bool) -> SslStream<Datagrams> {
    let mut b = SslContextBuilder::new(SslMethod::dtls_client()).expect("context");
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))
        .expect("version");
    b.set_cipher_list(&format!("{suites}:@SECLEVEL=0"))
        .expect("suites");
    if !ems {
        b.set_options(SslOptions::from_bits_retain(NO_EMS));
    }
    b.set_psk_client_callback(|_, _, id, key| {
        id[..IDENTITY.len()].copy_from_slice(IDENTITY);
        id[IDENTITY.len()] = 0;
        key[..KEY.len()].copy_from_slice(KEY);
        Ok(KEY.len())
    });
    let mut ssl = Ssl::new(&b.build()).expect("ssl");
    ssl.set_mtu(1152).expect("mtu");
    ssl.set_connect_state();
    SslStream::new(ssl, Datagrams::default()).expect("stream")
}

/// A handshake between `client` and `server`; the server's time in it.
fn handshake(
    client: &mut SslStream<Datagrams>,
    server: &mut dyn Server,
) -> Result<Duration, String> {
    let mut spent = Duration::ZERO;
    for _ in 0..20 {
        let done = match client.do_handshake() {
            Ok(()) => true,
            Err(e) if e.code() == ErrorCode::WANT_READ => false,
            Err(e) => return Err(format!("client: {e}")),
        };
        for d in std::mem::take(&mut client.get_mut().outbox) {
            let t = Instant::now();
            let (out, _) = server.receive(&d).map_err(|e| format!("server: {e}"))?;
            spent += t.elapsed();
            client.get_mut().inbox.extend(out);
        }
        if done && server.connected() {
            return Ok(spent);
        }
    }
    Err("no handshake after 20 flights".to_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Server µs per handshake, per record received and per record sent (medians of rounds).
fn measure(new_server: NewServer<'_>, suite: &str) -> (f64, f64, f64) {
    let (mut hs, mut rx, mut tx) = (Vec::new(), Vec::new(), Vec::new());
    let request = [0x40u8; 40];
    let segment = [0x5Au8; 520];
    for _ in 0..ROUNDS {
        let mut spent = Duration::ZERO;
        for _ in 0..HANDSHAKES {
            let mut c = client(suite, true);
            spent += handshake(&mut c, new_server().as_mut()).expect("handshake");
        }
        hs.push(spent.as_secs_f64() * 1e6 / HANDSHAKES as f64);
        let mut c = client(suite, true);
        let mut server = new_server();
        handshake(&mut c, server.as_mut()).expect("handshake");
        let (mut received, mut sent) = (Duration::ZERO, Duration::ZERO);
        let mut buf = [0u8; 2048];
        for _ in 0..RECORDS {
            c.ssl_write(&request).expect("client write");
            let d = c.get_mut().outbox.pop().expect("a record");
            let t = Instant::now();
            let (_, plain) = server.receive(&d).expect("server read");
            received += t.elapsed();
            assert_eq!(plain.len(), 1);
            let t = Instant::now();
            let out = server.send(&segment);
            sent += t.elapsed();
            c.get_mut().inbox.extend(out);
            assert_eq!(c.ssl_read(&mut buf).expect("client read"), segment.len());
        }
        rx.push(received.as_secs_f64() * 1e6 / RECORDS as f64);
        tx.push(sent.as_secs_f64() * 1e6 / RECORDS as f64);
    }
    (median(hs), median(rx), median(tx))
}

fn main() {
    let both = format!("{CCM8}:{CBC}");
    let config = dimpl_config();
    let ossl_ccm8 = openssl_server_context(&both, true);
    let ossl_kept = openssl_server_context(&both, false);
    let ossl_cbc = openssl_server_context(CBC, true);
    let new_openssl = || Box::new(OpensslServer::new(&ossl_ccm8)) as Box<dyn Server>;
    let new_dimpl = || Box::new(DimplServer::new(&config)) as Box<dyn Server>;
    let servers: [(&str, NewServer<'_>); 2] = [("OpenSSL", &new_openssl), ("dimpl", &new_dimpl)];
    println!(
        "interop (server ← OpenSSL {} client):",
        openssl::version::version()
    );
    for (name, new_server) in &servers {
        for (offer, ems) in [(both.as_str(), true), (both.as_str(), false), (CBC, true)] {
            let mut c = client(offer, ems);
            let outcome = match handshake(&mut c, new_server().as_mut()) {
                Ok(_) => format!(
                    "ok ({})",
                    c.ssl().current_cipher().map_or("?", |c| c.name())
                ),
                Err(e) => format!("fails: {e}"),
            };
            println!(
                "  {name:8} client offers {offer}, EMS {}: {outcome}",
                if ems { "on " } else { "off" }
            );
        }
    }
    println!(
        "server CPU, µs (medians of {ROUNDS} rounds of {HANDSHAKES} handshakes and {RECORDS} records each way):"
    );
    println!(
        "  {:34} {:>10} {:>12} {:>12}",
        "", "handshake", "record in", "record out"
    );
    let rows: [(&str, NewServer<'_>, &str); 4] = [
        ("OpenSSL, AES-128-CCM-8", &new_openssl, CCM8),
        (
            "  the same, buffers kept",
            &|| Box::new(OpensslServer::new(&ossl_kept)),
            CCM8,
        ),
        (
            "OpenSSL, AES-128-CBC-HMAC-SHA256",
            &|| Box::new(OpensslServer::new(&ossl_cbc)),
            CBC,
        ),
        ("dimpl, AES-128-CCM-8", &new_dimpl, CCM8),
    ];
    for (name, new_server, suite) in rows {
        let (hs, rx, tx) = measure(new_server, suite);
        println!("  {name:34} {hs:>10.1} {rx:>12.2} {tx:>12.2}");
    }
}
