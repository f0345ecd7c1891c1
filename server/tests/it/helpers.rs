//! `spawn_app`: the real application on port 0 in a fresh data directory, on a manual clock, and an HTTPS
//! client that trusts only the CA Updraft generated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backend::clock::ManualClock;
use domain::Timestamp;
use server::config::Settings;
use server::startup::Application;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) const PASSWORD: &str = "correct-horse-battery";
pub(crate) const START: i64 = 1_795_000_000_000;

pub(crate) struct TestApp {
    pub base: String,
    pub origin: String,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub data_dir: PathBuf,
    /// The running application's services (fixtures the HTTP surface cannot create yet).
    pub state: backend::AppState,
    /// Plain MQTT.
    pub mqtt: std::net::SocketAddr,
    /// MQTT over TLS.
    pub mqtts: std::net::SocketAddr,
    /// CoAP (LwM2M).
    pub coap: std::net::SocketAddr,
    /// CoAPS (LwM2M over DTLS).
    pub coaps: std::net::SocketAddr,
    /// `/metrics` over plain HTTP, when `metrics.listen` is set.
    pub metrics_plain: Option<std::net::SocketAddr>,
    /// The CA certificate the server's certificate chains to (PEM).
    pub ca_pem: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub(crate) fn settings_for(data_dir: &Path) -> Settings {
    let mut s = Settings {
        data_dir: data_dir.to_path_buf(),
        ..Default::default()
    };
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    s.mqtt.tls_listen = "127.0.0.1:0".parse().unwrap();
    s.lwm2m.listen = "127.0.0.1:0".parse().unwrap();
    s.lwm2m.dtls_listen = "127.0.0.1:0".parse().unwrap();
    // CoAP retransmissions are transport timing, not flow deadlines: short, so lost datagrams cost little.
    s.lwm2m.ack_timeout = std::time::Duration::from_millis(200);
    s.admin.password = Some(PASSWORD.to_owned().into());
    // Notification receivers in the tests listen on loopback.
    s.notifications.allow_private = true;
    s
}

pub(crate) async fn spawn_app(data_dir: &Path) -> TestApp {
    spawn_with(settings_for(data_dir)).await
}

/// Starts the application with `settings`; the client trusts the generated CA, or `settings.tls.cert`.
pub(crate) async fn spawn_with(settings: Settings) -> TestApp {
    spawn_on_clock(settings, ManualClock::new(Timestamp::from_millis(START))).await
}

/// [`spawn_with`] on a given clock (instances of one deployment share one).
pub(crate) async fn spawn_on_clock(settings: Settings, clock: ManualClock) -> TestApp {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let data_dir = settings.data_dir.clone();
    if std::env::var_os("TEST_LOG").is_some() {
        server::telemetry::init(
            server::config::LogFormat::Text,
            "debug",
            std::io::stderr,
            false,
        );
    }
    let trust = settings.tls.cert.clone();
    let app = Box::pin(Application::build(settings, Arc::new(clock.clone())))
        .await
        .expect("application builds");
    let addr = app.https_addr();
    let (mqtt, mqtts) = app.mqtt_addrs().expect("MQTT is enabled");
    let coap = app.coap_addr().expect("CoAP is enabled");
    let coaps = app.coaps_addr().expect("CoAPS is enabled");
    let metrics_plain = app.metrics_addr();
    let state = app.state().clone();
    let ca = std::fs::read(
        trust
            .as_deref()
            .or(app.ca_path())
            .expect("a certificate to trust"),
    )
    .unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The certificate names localhost and 127.0.0.1; check the real name against the real CA.
    TestApp {
        base: format!("https://localhost:{}", addr.port()),
        origin: format!("https://localhost:{}", addr.port()),
        client,
        clock,
        data_dir,
        state,
        mqtt,
        mqtts,
        coap,
        coaps,
        metrics_plain,
        ca_pem: ca.clone(),
        stop: Some(tx),
        task: Some(task),
    }
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A raw TLS connection to the HTTPS port (trusting only the app's CA), for writing requests by hand.
    pub(crate) async fn tls_connect(
        &self,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&self.ca_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let port = self.base.trim_start_matches("https://localhost:");
        let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// Stops the server gracefully and waits for it.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stops cleanly");
        }
    }

    /// Ends the server abruptly, as a crash would: no graceful shutdown, no clean-up.
    pub(crate) async fn kill(mut self) {
        let stop = self.stop.take();
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        drop(stop);
    }

    /// Signs in as the admin; returns the session cookie (`name=value`).
    pub(crate) async fn sign_in(&self) -> String {
        let resp = self
            .client
            .post(self.url("/auth/login"))
            .header("origin", &self.origin)
            .form(&[("username", "admin"), ("password", PASSWORD), ("next", "")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 303, "login redirects");
        assert_eq!(resp.headers()["location"], "/devices");
        let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        cookie.split(';').next().unwrap().to_owned()
    }

    /// Calls a server function as the browser does (URL-encoded arguments).
    pub(crate) async fn server_fn(
        &self,
        cookie: &str,
        name: &str,
        args: &[(&str, &str)],
    ) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/api/{name}")))
            .header("origin", &self.origin)
            .header("cookie", cookie)
            .header("accept", "application/json")
            .form(args)
            .send()
            .await
            .unwrap()
    }
}

/// A moto S3 server on a free port, killed on drop.
pub(crate) struct Moto {
    child: std::process::Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // scripts/setup.sh installs it into a private venv when it is not on PATH.
    let venv = std::path::Path::new(&std::env::var("HOME").unwrap_or_default())
        .join(".cache/updraft/moto-venv/bin/moto_server");
    let program = if venv.exists() {
        venv
    } else {
        "moto_server".into()
    };
    let child = std::process::Command::new(program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server: run scripts/setup.sh (it installs moto[server])");
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{endpoint}/moto-api/"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let resp = client
        .put(format!("{endpoint}/updraft"))
        .send()
        .await
        .expect("moto answers");
    assert!(
        resp.status().is_success(),
        "creating the bucket: {}",
        resp.status()
    );
    Moto { child, endpoint }
}
