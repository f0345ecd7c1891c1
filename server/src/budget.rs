//! The descriptor budget: every connection, open file and database handle is a file descriptor, and the
//! process has a fixed number of them (`RLIMIT_NOFILE`; 20 000 on the development machines, where the hard
//! limit cannot be raised). At start-up Updraft raises the soft limit to the hard one, then divides what it
//! has between the listeners, so that each refuses at the edge with its protocol's "busy" answer (MQTT
//! CONNACK 3, HTTP 503 with `Retry-After`) before the process as a whole runs out and an unrelated
//! operation (opening a package, a database file) fails.
//!
//! | share | default |
//! |---|---|
//! | reserved: stdio, listeners, logs, resolver, webhooks, blocking pool | 256 |
//! | database pool | 3 per SQLite connection (file, WAL, shared memory), 1 per PostgreSQL one |
//! | package files being served (each shared by all its downloads) | `packages.max_open_files` |
//! | HTTPS connections (console, API, downloads) | `http.max_connections`, default 1/16 of the rest, at most 1 024 |
//! | MQTT device connections | `mqtt.max_connections`, default all that remains |
//! | refusals in progress | 64 for HTTPS, 64 for MQTT (plain and TLS together): a connection past its cap is answered "busy" and closed |
//!
//! A configuration that cannot fit (say `mqtt.max_connections` above what remains) stops start-up with
//! the numbers. Memory is not divided here: what each connection costs is measured and reported by the
//! benchmarks (see the README's device ceiling).

use secrecy::ExposeSecret;

use crate::config::{Settings, StoreKind};

/// Descriptors kept for the process itself, its listeners, logs, DNS lookups and webhook deliveries.
pub const RESERVED: u64 = 256;
/// HTTPS connections past the cap that may be in the middle of being refused at once (the MQTT
/// endpoint's allowance is `backend::mqtt::REFUSING`, shared by its plain and TLS listeners).
pub const REFUSING: u64 = 64;
/// The default HTTPS connection cap, at most.
const HTTPS_DEFAULT_MAX: u64 = 1024;
/// The smallest share that still works for each listener.
const MIN_SHARE: u64 = 16;

/// How the descriptors are divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The process's descriptor limit after raising it.
    pub descriptors: u64,
    /// Kept for the process (see [`RESERVED`]).
    pub reserved: u64,
    /// The database pool's share.
    pub database: u64,
    /// Package files open at once.
    pub package_files: u64,
    /// HTTPS connections served at once.
    pub https: u64,
    /// MQTT device connections at once (plain and TLS together).
    pub mqtt: u64,
    /// Connections being refused at once: HTTPS and MQTT together.
    pub refusing: u64,
}

impl Budget {
    /// Divides `descriptors` as `settings` ask; an explicit cap that does not fit is an error naming the
    /// numbers.
    ///
    /// # Errors
    /// A message for the operator.
    pub fn plan(settings: &Settings, descriptors: u64) -> Result<Self, String> {
        let database = if settings
            .database_url()
            .expose_secret()
            .starts_with("sqlite:")
        {
            3 * u64::from(backend::db::SQLITE_POOL)
        } else {
            u64::from(backend::db::POSTGRES_POOL)
        };
        let package_files = match settings.packages.store {
            StoreKind::Local => settings.packages.max_open_files as u64,
            StoreKind::S3 => 0,
        };
        let mqtt_on = settings.mqtt.enabled;
        let refusing = REFUSING
            + if mqtt_on {
                backend::mqtt::REFUSING as u64
            } else {
                0
            };
        let fixed = RESERVED + database + package_files + refusing;
        let available = descriptors.checked_sub(fixed).filter(|a| *a >= 2 * MIN_SHARE).ok_or_else(|| {
            format!(
                "the process may open {descriptors} file descriptors (RLIMIT_NOFILE), but Updraft needs \
                 {fixed} before any connection ({RESERVED} reserved, {database} database, \
                 {package_files} package files (packages.max_open_files), {refusing} for refusals) and \
                 at least {} more; raise the limit (ulimit -n, systemd LimitNOFILE)",
                2 * MIN_SHARE
            )
        })?;
        let https = match settings.http.max_connections {
            Some(n) => n as u64,
            None if mqtt_on => (available / 16).clamp(MIN_SHARE, HTTPS_DEFAULT_MAX),
            None => available.min(16 * HTTPS_DEFAULT_MAX),
        };
        let mqtt = match (mqtt_on, settings.mqtt.max_connections) {
            (false, _) => 0,
            (true, Some(n)) => n as u64,
            (true, None) => available.saturating_sub(https),
        };
        let budget = Self {
            descriptors,
            reserved: RESERVED,
            database,
            package_files,
            https,
            mqtt,
            refusing,
        };
        if https < 1 || (mqtt_on && mqtt < 1) || https + mqtt > available {
            return Err(format!(
                "the connection caps do not fit in {descriptors} file descriptors: \
                 http.max_connections {https} + mqtt.max_connections {mqtt} = {} > {available} left after \
                 {fixed} for the process, database, package files and refusals ({budget}); lower the caps \
                 or raise the limit (ulimit -n, systemd LimitNOFILE)",
                https + mqtt
            ));
        }
        Ok(budget)
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} descriptors: {} reserved, {} database, {} package files, {} HTTPS, {} MQTT, {} for refusals",
            self.descriptors,
            self.reserved,
            self.database,
            self.package_files,
            self.https,
            self.mqtt,
            self.refusing
        )
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the limit now in force (the soft one if
/// raising failed, with a warning).
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(error.message = %e, soft, "could not raise the descriptor limit");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::default()
    }

    #[test]
    fn twenty_thousand_descriptors_leave_room_for_eighteen_thousand_devices() {
        let b = Budget::plan(&settings(), 20_000).unwrap();
        assert_eq!(b.database, 24);
        assert_eq!(b.package_files, 64);
        assert_eq!(b.https, 1024);
        assert!(b.mqtt >= 18_000, "{b}");
        assert_eq!(
            b.reserved + b.database + b.package_files + b.refusing + b.https + b.mqtt,
            20_000
        );
    }

    #[test]
    fn a_small_limit_shrinks_https_to_a_sixteenth() {
        let b = Budget::plan(&settings(), 4096).unwrap();
        assert_eq!(b.https, (4096 - 256 - 24 - 64 - 128) / 16);
    }

    #[test]
    fn explicit_caps_that_do_not_fit_are_refused_with_the_numbers() {
        let mut s = settings();
        s.mqtt.max_connections = Some(19_000);
        let e = Budget::plan(&s, 20_000).unwrap_err();
        assert!(e.contains("mqtt.max_connections 19000"), "{e}");
        assert!(e.contains("20000 file descriptors"), "{e}");
        s.mqtt.max_connections = Some(1000);
        s.http.max_connections = Some(500);
        let b = Budget::plan(&s, 20_000).unwrap();
        assert_eq!((b.https, b.mqtt), (500, 1000));
    }

    #[test]
    fn a_limit_too_small_for_anything_is_refused() {
        let e = Budget::plan(&settings(), 300).unwrap_err();
        assert!(e.contains("raise the limit"), "{e}");
    }

    #[test]
    fn without_mqtt_https_gets_the_room() {
        let mut s = settings();
        s.mqtt.enabled = false;
        let b = Budget::plan(&s, 20_000).unwrap();
        assert_eq!(b.mqtt, 0);
        assert_eq!(b.https, 16_384);
    }
}
