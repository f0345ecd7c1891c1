//! The DTLS layer against OpenSSL clients over real UDP on loopback.

use std::net::UdpSocket as StdSocket;

use openssl::ssl::SslConnector;

use super::*;

/// A client's socket, connected to the server: one read is one datagram.
#[derive(Debug)]
struct Connected(StdSocket);

impl Read for Connected {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Connected {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lookup() -> KeyLookup {
    Arc::new(|identity: String| {
        Box::pin(async move {
            (identity == "863705000000001").then(|| Psk {
                device_id: "meter_863705000000001".to_owned(),
                key: b"0123456789abcdef".to_vec(),
            })
        }) as BoxFuture<'static, Option<Psk>>
    })
}

/// A server echoing what its sessions carry; its address.
async fn echo_server() -> (Arc<Dtls>, SocketAddr) {
    echo_server_with(DtlsSettings::default()).await
}

/// [`echo_server`] with `settings`.
async fn echo_server_with(settings: DtlsSettings) -> (Arc<Dtls>, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.writable().await.unwrap();
    let dtls = Arc::new(Dtls::new(socket, settings, lookup()).unwrap());
    let addr = dtls.local_addr().unwrap();
    let server = dtls.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut messages = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = server.recv(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    server.receive(&buf[..n], from, &mut messages);
                    for plain in messages.drain(..) {
                        assert!(server.send(&plain, from));
                        recycle(plain);
                    }
                }
                _ = tick.tick() => server.tick(),
            }
        }
    });
    (dtls, addr)
}

/// A DTLS-PSK client's handshake with `identity`/`key`, then "hello" sent; its echo, and the
/// client's address.
fn client(
    server: SocketAddr,
    identity: &'static str,
    key: &'static [u8],
) -> io::Result<(Vec<u8>, SocketAddr)> {
    client_on(StdSocket::bind("127.0.0.1:0")?, server, identity, key)
}

/// [`client`] on a given socket.
fn client_on(
    socket: StdSocket,
    server: SocketAddr,
    identity: &'static str,
    key: &'static [u8],
) -> io::Result<(Vec<u8>, SocketAddr)> {
    let local = socket.local_addr()?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut stream = handshake(Connected(socket), identity, key)?;
    stream.write_all(b"hello")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    Ok((buf[..n].to_vec(), local))
}

/// A DTLS-PSK client's handshake over `io` with `identity`/`key`.
fn handshake<S: Read + Write + std::fmt::Debug>(
    io: S,
    identity: &'static str,
    key: &'static [u8],
) -> io::Result<SslStream<S>> {
    let mut builder = SslConnector::builder(SslMethod::dtls_client()).map_err(io::Error::other)?;
    builder.set_cipher_list(CIPHERS).map_err(io::Error::other)?;
    builder.set_psk_client_callback(move |_, _, id, psk| {
        id[..identity.len()].copy_from_slice(identity.as_bytes());
        id[identity.len()] = 0;
        psk[..key.len()].copy_from_slice(key);
        Ok(key.len())
    });
    let connector = builder.build();
    let mut config = connector.configure().map_err(io::Error::other)?;
    config.set_verify_hostname(false);
    config
        .connect("updraft", io)
        .map_err(|e| io::Error::other(format!("{e:?}")))
}

/// A client's socket that can hold what is written and send it as one datagram.
#[derive(Debug)]
struct Coalescing {
    socket: StdSocket,
    /// Written and not sent yet, while holding.
    held: Option<Vec<u8>>,
}

impl Read for Coalescing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
}

impl Write for Coalescing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.held {
            Some(held) => {
                held.extend_from_slice(buf);
                Ok(buf.len())
            }
            None => self.socket.send(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_coalesced_in_one_datagram_all_come_through() {
    let (_dtls, addr) = echo_server().await;
    let echoes = tokio::task::spawn_blocking(move || -> io::Result<Vec<Vec<u8>>> {
        let socket = StdSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let io = Coalescing { socket, held: None };
        let mut stream = handshake(io, "863705000000001", b"0123456789abcdef")?;
        stream.get_mut().held = Some(Vec::new());
        for message in [&b"one"[..], b"two", b"three"] {
            stream.write_all(message)?;
        }
        let datagram = stream.get_mut().held.take().unwrap_or_default();
        assert_eq!(application_records(&datagram), Some(3));
        stream.get_ref().socket.send(&datagram)?;
        let mut echoes = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let n = stream.read(&mut buf)?;
            echoes.push(buf[..n].to_vec());
        }
        Ok(echoes)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(echoes, [&b"one"[..], b"two", b"three"]);
}

#[test]
fn application_records_are_counted_only_when_nothing_else_is_there() {
    let record = |content: u8, body: &[u8]| {
        let mut r = vec![content, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 0, 7];
        r.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        r.extend_from_slice(body);
        r
    };
    let app = record(23, &[0xAB; 40]);
    assert_eq!(application_records(&app), Some(1));
    assert_eq!(
        application_records(&[app.clone(), app.clone()].concat()),
        Some(2)
    );
    // An alert after the data (a close_notify): read until OpenSSL has nothing left.
    assert_eq!(
        application_records(&[app.clone(), record(21, &[1, 0])].concat()),
        None
    );
    assert_eq!(application_records(&record(22, &[1; 20])), None);
    assert_eq!(
        application_records(&app[..app.len() - 1]),
        None,
        "truncated"
    );
    assert_eq!(application_records(&app[..10]), None, "a header cut short");
    assert_eq!(application_records(&[]), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_its_key_gets_a_session_and_others_do_not() {
    let (dtls, addr) = echo_server().await;
    let echoed =
        tokio::task::spawn_blocking(move || client(addr, "863705000000001", b"0123456789abcdef"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(echoed.0, b"hello");
    assert_eq!(dtls.counts(), (1, 0));
    assert_eq!(
        dtls.device_at(echoed.1).as_deref(),
        Some("meter_863705000000001"),
        "the session is the device's whose key it used"
    );
    let wrong_key =
        tokio::task::spawn_blocking(move || client(addr, "863705000000001", b"wrong-key-bytes!"))
            .await
            .unwrap();
    assert!(wrong_key.is_err(), "{wrong_key:?}");
    let unknown =
        tokio::task::spawn_blocking(move || client(addr, "863705000000999", b"0123456789abcdef"))
            .await
            .unwrap();
    assert!(unknown.is_err(), "{unknown:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dtls.counts().0, 1, "failed handshakes leave no session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_client_hello_gets_one_small_hello_verify_request() {
    let hello = first_client_hello();
    let n = hello.len();
    let (dtls, addr) = echo_server().await;
    let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    spoofer.send_to(&hello, addr).await.unwrap();
    let mut answer = vec![0u8; 2048];
    let (m, _) = tokio::time::timeout(Duration::from_secs(2), spoofer.recv_from(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer[0], 22, "a handshake record");
    assert_eq!(answer[13], 3, "HelloVerifyRequest");
    assert!(m <= n, "no amplification: {m} bytes for {n}");
    // Nothing more comes (the ServerHello waits for the cookie), and the half-open state is one.
    let more =
        tokio::time::timeout(Duration::from_millis(500), spoofer.recv_from(&mut answer)).await;
    assert!(more.is_err(), "only the HelloVerifyRequest");
    assert_eq!(dtls.counts(), (0, 1));
}

/// The first ClientHello a client sends (no cookie), caught on a socket that never answers.
fn first_client_hello() -> Vec<u8> {
    let catcher = StdSocket::bind("127.0.0.1:0").unwrap();
    catcher
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let target = catcher.local_addr().unwrap();
    std::thread::spawn(move || {
        let _ = client(target, "863705000000001", b"0123456789abcdef");
    });
    let mut hello = vec![0u8; 2048];
    let n = catcher.recv(&mut hello).unwrap();
    hello.truncate(n);
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_handshake_replaces_a_session_only_once_it_echoes_its_cookie() {
    let (dtls, addr) = echo_server().await;
    let socket = StdSocket::bind("127.0.0.1:0").unwrap();
    let device_socket = socket.try_clone().unwrap();
    let (_, local) = tokio::task::spawn_blocking(move || {
        client_on(socket, addr, "863705000000001", b"0123456789abcdef")
    })
    .await
    .unwrap()
    .unwrap();
    assert!(dtls.device_at(local).is_some());
    // A cookie-less ClientHello from the session's address (anyone can forge one): a
    // HelloVerifyRequest, and the session stays.
    let hello = first_client_hello();
    device_socket.send_to(&hello, addr).unwrap();
    device_socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answer = vec![0u8; 2048];
    let _ = device_socket.recv(&mut answer).unwrap();
    assert_eq!(answer[13], 3, "HelloVerifyRequest");
    assert_eq!(
        dtls.device_at(local).as_deref(),
        Some("meter_863705000000001")
    );
    assert!(dtls.take_ended().is_empty());
    // The device really handshakes again from there: the new session replaces the old one.
    let echoed = tokio::task::spawn_blocking(move || {
        client_on(device_socket, addr, "863705000000001", b"0123456789abcdef")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(echoed.0, b"hello");
    assert_eq!(dtls.counts(), (1, 0));
    assert_eq!(
        dtls.take_ended(),
        [(local, "meter_863705000000001".to_owned())],
        "the old session ended"
    );
    assert!(dtls.device_at(local).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_cap_push_the_oldest_out() {
    let (dtls, addr) = echo_server_with(DtlsSettings {
        max_handshakes: 2,
        ..DtlsSettings::default()
    })
    .await;
    let hello = first_client_hello();
    let mut sources = Vec::new();
    for _ in 0..3 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&hello, addr).await.unwrap();
        let mut answer = vec![0u8; 2048];
        tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut answer))
            .await
            .unwrap()
            .unwrap();
        sources.push(s.local_addr().unwrap());
    }
    assert_eq!(dtls.counts(), (0, 2), "two handshakes at most");
    let peers = lock(&dtls.peers);
    assert!(!peers.contains_key(&sources[0]), "the oldest went");
    assert!(peers.contains_key(&sources[1]) && peers.contains_key(&sources[2]));
}

#[test]
fn a_secure_peer_is_never_the_plain_peer_of_the_same_address() {
    for plain in ["127.0.0.1:40000", "[2001:db8::7]:5683", "[fe80::1%2]:9"] {
        let plain: SocketAddr = plain.parse().unwrap();
        let marked = secure(plain);
        assert_ne!(marked, plain);
        assert_eq!(unsecure(marked), Some(plain));
        assert_eq!(unsecure(plain), None, "{plain} is a plain peer");
    }
    // An IPv4-mapped address received on a dual-stack socket stays one.
    let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
    assert_eq!(unsecure(secure(mapped)), Some(mapped));
}

#[test]
fn psk_identities_are_found_in_client_key_exchanges() {
    // Record header (handshake, DTLS 1.2, epoch 0), then ClientKeyExchange with identity "abc".
    let mut d = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 4, 0, 17];
    d.extend([16, 0, 0, 5, 0, 2, 0, 0, 0, 0, 0, 5, 0, 3, b'a', b'b', b'c']);
    assert_eq!(psk_identity(&d).as_deref(), Some("abc"));
    assert_eq!(psk_identity(&d[..20]), None, "cut short");
    d[3] = 1;
    assert_eq!(psk_identity(&d), None, "encrypted (epoch 1)");
}

#[test]
fn datagram_buffers_are_reused_and_the_spares_are_bounded() {
    // A fresh thread: its spares start empty.
    std::thread::spawn(|| {
        let first = buffer_of(b"record one");
        let at = first.as_ptr();
        recycle(first);
        let again = buffer_of(b"two");
        assert_eq!(again.as_ptr(), at, "the spare buffer came back");
        assert_eq!(again, b"two", "holding only the new bytes");

        // Through a session's view of the network: what OpenSSL read goes back to the spares.
        let mut datagrams = Datagrams::default();
        datagrams.push(b"in");
        let at = datagrams.inbox[0].as_ptr();
        let mut buf = [0u8; 8];
        assert_eq!(datagrams.read(&mut buf).unwrap(), 2);
        let reused = buffer_of(b"x");
        assert_eq!(reused.as_ptr(), at);

        // Oversized buffers are not kept, and a thread keeps SPARE_BUFFERS at most.
        recycle(Vec::with_capacity(SPARE_CAPACITY + 1));
        assert_eq!(SPARE.with_borrow(Vec::len), 0);
        for _ in 0..SPARE_BUFFERS + 10 {
            recycle(Vec::with_capacity(64));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_BUFFERS);
    })
    .join()
    .unwrap();
}
