//! The package store: package bytes in a local directory (the default, `./data/packages`) or in any
//! S3-compatible bucket, through `object_store`.
//!
//! - **Writes stream.** [`PackageStore::put_stream`] feeds the body into a multipart upload part by part
//!   (8 MiB parts, at most two in flight), hashing SHA-256 and counting bytes on the way, so a 2 GiB package
//!   never sits in memory. The object becomes visible only when the upload completes; an error, an
//!   oversize body or a dropped future aborts it, leaving no half object behind.
//! - **Reads stream.** [`PackageStore::open_range`] returns a [`ObjectReader`] over a byte range. For the
//!   local directory it reads the file `object_store` opened in chunks the caller sizes (the downloader
//!   shrinks them as concurrency grows, to bound memory); for S3 it forwards the GET body.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use domain::package::ObjectKey;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, WriteMultipart,
};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Size of each multipart part (S3 needs at least 5 MiB for all but the last).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploaded concurrently per package.
const PARTS_IN_FLIGHT: usize = 2;

/// Where packages live.
#[derive(Clone, Debug)]
pub enum StoreLocation {
    /// A directory on this machine.
    Local {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// An S3-compatible bucket.
    S3 {
        /// Endpoint URL (`https://s3.example.com`); AWS when `None`.
        endpoint: Option<String>,
        /// Region (`us-east-1`, `cn-north-4`...).
        region: String,
        /// Access key id; taken from the environment (`AWS_ACCESS_KEY_ID`...) when `None`.
        access_key_id: Option<String>,
        /// Secret access key.
        secret_access_key: Option<SecretString>,
        /// `https://bucket.host/key` instead of `https://host/bucket/key`.
        virtual_hosted_style: bool,
        /// Allow a plain `http://` endpoint (test servers, a private network).
        allow_http: bool,
    },
}

/// The package store's settings.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// The bucket name: the S3 bucket, or the name bucket registrations must use for the local directory.
    pub bucket: String,
    /// Where the bytes go.
    pub location: StoreLocation,
    /// The largest package accepted, in bytes.
    pub max_package_size: u64,
}

/// What a completed write or a digest measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest256 {
    /// Bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// The package store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PackageStore {
    inner: Arc<dyn ObjectStore>,
    bucket: Arc<str>,
    max_package_size: u64,
}

impl PackageStore {
    /// Opens the store (creating the local directory if needed). Nothing is contacted yet.
    ///
    /// # Errors
    /// [`Error::Internal`] when the directory cannot be created or the S3 settings are incomplete.
    pub fn open(settings: &StoreSettings) -> Result<Self> {
        domain::package::parse_bucket_name(&settings.bucket)?;
        let inner: Arc<dyn ObjectStore> = match &settings.location {
            StoreLocation::Local { dir } => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::Internal(format!(
                        "creating the package directory {}: {e}",
                        dir.display()
                    ))
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| {
                        Error::Internal(format!("package directory {}: {e}", dir.display()))
                    })?
                    .with_automatic_cleanup(true);
                Arc::new(fs)
            }
            StoreLocation::S3 {
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                virtual_hosted_style,
                allow_http,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(settings.bucket.clone())
                    .with_region(region.clone())
                    .with_virtual_hosted_style_request(*virtual_hosted_style)
                    .with_allow_http(*allow_http);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e.clone());
                }
                if let Some(k) = access_key_id {
                    b = b.with_access_key_id(k.clone());
                }
                if let Some(s) = secret_access_key {
                    b = b.with_secret_access_key(s.expose_secret().to_owned());
                }
                let s3 = b
                    .build()
                    .map_err(|e| Error::Internal(format!("S3 package store: {e}")))?;
                Arc::new(s3)
            }
        };
        Ok(Self {
            inner,
            bucket: Arc::from(settings.bucket.as_str()),
            max_package_size: settings.max_package_size,
        })
    }

    /// The bucket name registrations must use.
    #[must_use]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The largest package accepted, in bytes.
    #[must_use]
    pub const fn max_package_size(&self) -> u64 {
        self.max_package_size
    }

    fn path(key: &ObjectKey) -> Result<Path> {
        Path::parse(key.as_str())
            .map_err(|e| domain::ValidationError::new("object_key", e.to_string()).into())
    }

    /// Streams `body` into a new object at `key`, measuring size and SHA-256. Nothing is left behind when
    /// the body fails, exceeds the maximum size or is empty, or when this future is dropped.
    ///
    /// # Errors
    /// [`Error::Validation`] (field `file`) when the body fails or is empty; [`Error::TooLarge`];
    /// [`Error::Storage`] when the store fails.
    pub async fn put_stream<S, E>(&self, key: &ObjectKey, mut body: S) -> Result<Digest256>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        let path = Self::path(key)?;
        let upload = self.inner.put_multipart(&path).await?;
        let mut writer = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE)));
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    writer.abort().await;
                    return Err(domain::ValidationError::new(
                        "file",
                        format!("upload interrupted: {e}"),
                    )
                    .into());
                }
            };
            size += chunk.len() as u64;
            if size > self.max_package_size {
                writer.abort().await;
                return Err(Error::TooLarge {
                    limit: self.max_package_size,
                });
            }
            hasher.update(&chunk);
            let w = writer.get();
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                writer.abort().await;
                return Err(e.into());
            }
            w.put(chunk);
        }
        if size == 0 {
            writer.abort().await;
            return Err(domain::ValidationError::new("file", "the file is empty").into());
        }
        writer.finish().await?;
        Ok(Digest256 {
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// The object's size, or `None` when it does not exist.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn size(&self, key: &ObjectKey) -> Result<Option<u64>> {
        match self.inner.head(&Self::path(key)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the whole object once to measure its size and SHA-256 (bucket registrations). `None` when it
    /// does not exist.
    ///
    /// # Errors
    /// [`Error::TooLarge`]; [`Error::Storage`].
    pub async fn digest(&self, key: &ObjectKey) -> Result<Option<Digest256>> {
        let Some(size) = self.size(key).await? else {
            return Ok(None);
        };
        if size > self.max_package_size {
            return Err(Error::TooLarge {
                limit: self.max_package_size,
            });
        }
        let mut reader = self.open_range(key, 0..size, 1024 * 1024).await?;
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        while let Some(chunk) = reader.next().await {
            let chunk = chunk.map_err(|e| Error::Internal(format!("reading {key}: {e}")))?;
            read += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(Some(Digest256 {
            size: read,
            sha256: hex::encode(hasher.finalize()),
        }))
    }

    /// Opens `range` of the object for streaming, read `chunk` bytes at a time where the store allows.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the object is gone; [`Error::Storage`].
    pub async fn open_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
        chunk: usize,
    ) -> Result<ObjectReader> {
        if range.is_empty() {
            return Ok(ObjectReader::Empty);
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let result = match self.inner.get_opts(&Self::path(key)?, options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::not_found("object", key.as_str()));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(match result.payload {
            GetResultPayload::File(file, _) => ObjectReader::File(FileChunks {
                file: Some(Arc::new(file)),
                pos: range.start,
                end: range.end,
                chunk: chunk.max(4096),
                pending: None,
                gauge: None,
            }),
            GetResultPayload::Stream(s) => ObjectReader::Stream(s),
        })
    }

    /// Deletes an object; a missing one is not an error.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        match self.inner.delete(&Self::path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` at `key` in one request (test fixtures and small objects).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<()> {
        let path = Path::parse(key).map_err(|e| Error::Internal(e.to_string()))?;
        self.inner.put(&path, bytes.into()).await?;
        Ok(())
    }

    /// Whether any object (complete or not) exists under `prefix`, for tests that prove nothing was left
    /// behind.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = Path::parse(prefix).map_err(|e| Error::Internal(e.to_string()))?;
        let mut out = Vec::new();
        let mut list = self.inner.list(Some(&prefix));
        while let Some(meta) = list.next().await {
            out.push(meta?.location.to_string());
        }
        Ok(out)
    }
}

/// Aborts the multipart upload when dropped unfinished (a cancelled request), in the background.
struct AbortOnDrop(Option<WriteMultipart>);

impl AbortOnDrop {
    fn get(&mut self) -> &mut WriteMultipart {
        self.0.as_mut().expect("used after finish/abort")
    }

    async fn abort(&mut self) {
        if let Some(w) = self.0.take()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(error.message = %e, "aborting a package upload failed");
        }
    }

    async fn finish(&mut self) -> Result<()> {
        let w = self.0.take().expect("finished twice");
        // `finish` aborts the upload itself when completing fails.
        w.finish().await?;
        Ok(())
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(w) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error.message = %e, "aborting a cancelled package upload failed");
                }
            });
        }
    }
}

/// A stream of an object's bytes.
pub enum ObjectReader {
    /// A zero-length range.
    Empty,
    /// A local file, read in caller-sized chunks on the blocking pool.
    File(FileChunks),
    /// A remote object's body.
    Stream(BoxStream<'static, object_store::Result<Bytes>>),
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "ObjectReader::Empty",
            Self::File(_) => "ObjectReader::File",
            Self::Stream(_) => "ObjectReader::Stream",
        })
    }
}

impl ObjectReader {
    /// Changes the chunk size of the reads still to come (local files only).
    pub fn set_chunk(&mut self, chunk: usize) {
        if let Self::File(f) = self {
            f.chunk = chunk.max(4096);
        }
    }

    /// Counts the bytes of every chunk read from now on in `gauge` for as long as the chunk (or any slice
    /// of it) is alive, so callers can bound the memory held by chunks that are still queued for a slow
    /// reader (local files only).
    pub fn track(&mut self, gauge: Arc<AtomicUsize>) {
        if let Self::File(f) = self {
            f.gauge = Some(gauge);
        }
    }
}

/// A chunk's buffer that is counted in a gauge until dropped.
struct Counted {
    buf: Vec<u8>,
    gauge: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.buf.len(), Ordering::Relaxed);
    }
}

impl Stream for ObjectReader {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::File(f) => Pin::new(f).poll_next(cx),
            Self::Stream(s) => s
                .poll_next_unpin(cx)
                .map(|o| o.map(|r| r.map_err(io::Error::other))),
        }
    }
}

type ReadJob = tokio::task::JoinHandle<io::Result<Vec<u8>>>;

/// Positional reads of `pos..end` from a shared file handle, one chunk at a time on the blocking pool.
pub struct FileChunks {
    file: Option<Arc<std::fs::File>>,
    pos: u64,
    end: u64,
    chunk: usize,
    pending: Option<ReadJob>,
    gauge: Option<Arc<AtomicUsize>>,
}

impl Stream for FileChunks {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use std::os::unix::fs::FileExt;
        loop {
            if let Some(job) = self.pending.as_mut() {
                let result = std::task::ready!(Pin::new(job).poll(cx));
                self.pending = None;
                return Poll::Ready(Some(match result {
                    Ok(Ok(buf)) if buf.is_empty() => {
                        self.file = None;
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the file is shorter than recorded",
                        ))
                    }
                    Ok(Ok(buf)) => {
                        self.pos += buf.len() as u64;
                        Ok(match &self.gauge {
                            Some(gauge) => {
                                gauge.fetch_add(buf.len(), Ordering::Relaxed);
                                Bytes::from_owner(Counted {
                                    buf,
                                    gauge: gauge.clone(),
                                })
                            }
                            None => Bytes::from(buf),
                        })
                    }
                    Ok(Err(e)) => {
                        self.file = None;
                        Err(e)
                    }
                    Err(e) => {
                        self.file = None;
                        Err(io::Error::other(e))
                    }
                }));
            }
            if self.pos >= self.end {
                return Poll::Ready(None);
            }
            let Some(file) = self.file.clone() else {
                return Poll::Ready(None);
            };
            let len = usize::try_from(self.end - self.pos)
                .unwrap_or(usize::MAX)
                .min(self.chunk);
            let pos = self.pos;
            self.pending = Some(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len];
                let mut filled = 0;
                while filled < len {
                    match file.read_at(&mut buf[filled..], pos + filled as u64) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(filled);
                Ok(buf)
            }));
        }
    }
}
