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
//! - **A package being served is opened once.** Local files are shared by every download of them through
//!   [`OpenFiles`]: ten thousand devices fetching one package hold one descriptor for it, not ten
//!   thousand. At most `max_open_files` distinct packages are open at once; beyond that, and when the
//!   process is out of descriptors, a read is refused with [`Error::Busy`] (503 + `Retry-After` on the
//!   wire), never an internal error.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// With an S3-compatible store: send devices presigned URLs to the bucket (IoTDA's `*_upgrade_v2`)
    /// for uploaded packages too, not only for registered bucket objects, so bytes bypass Updraft.
    pub offload: bool,
    /// The most distinct local package files open at once (each is shared by all its downloads).
    pub max_open_files: usize,
    /// Other bucket names a registration may give for this store: the OBS bucket an IoTDA
    /// application's code already names.
    pub bucket_aliases: Vec<String>,
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
    /// The same store when it is S3-compatible (it can presign URLs).
    signer: Option<Arc<object_store::aws::AmazonS3>>,
    offload: bool,
    bucket: Arc<str>,
    bucket_aliases: Arc<[String]>,
    max_package_size: u64,
    /// The local directory's files being served (`None` for S3).
    open_files: Option<Arc<OpenFiles>>,
}

/// How long a caller refused for want of descriptors or open-file slots should wait.
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// The local package files being read, each opened once and shared by every reader (`read_at` needs no
/// seek position, so readers never disturb each other). An entry closes when its last reader is done.
#[derive(Debug)]
struct OpenFiles {
    fs: Arc<object_store::local::LocalFileSystem>,
    files: Mutex<HashMap<String, Weak<std::fs::File>>>,
    max: usize,
}

impl OpenFiles {
    /// The open file of `key`, shared, opening it if no reader has it open.
    async fn open(&self, key: &ObjectKey) -> Result<Arc<std::fs::File>> {
        if let Some(file) = self.live(key) {
            return Ok(file);
        }
        let path = self
            .fs
            .path_to_filesystem(&PackageStore::path(key)?)
            .map_err(Error::Storage)?;
        let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path))
            .await
            .map_err(|e| Error::Internal(format!("opening a package file: {e}")))?;
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::not_found("object", key.as_str()));
            }
            Err(e) if out_of_descriptors(&e) => {
                tracing::warn!(error.message = %e, "package store: out of file descriptors");
                return Err(Error::Busy {
                    what: "file descriptors",
                    retry_after: BUSY_RETRY,
                });
            }
            Err(e) => {
                return Err(Error::Internal(format!(
                    "opening package object {}: {e}",
                    key.as_str()
                )));
            }
        };
        let mut files = self.files();
        // Another reader may have opened it meanwhile: share theirs (ours closes here).
        if let Some(file) = files.get(key.as_str()).and_then(Weak::upgrade) {
            return Ok(file);
        }
        files.retain(|_, f| f.strong_count() > 0);
        if files.len() >= self.max {
            return Err(Error::Busy {
                what: "open package files",
                retry_after: BUSY_RETRY,
            });
        }
        let file = Arc::new(file);
        files.insert(key.as_str().to_owned(), Arc::downgrade(&file));
        Ok(file)
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<std::fs::File>>> {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(&self, key: &ObjectKey) -> Option<Arc<std::fs::File>> {
        self.files().get(key.as_str()).and_then(Weak::upgrade)
    }

    /// Forgets `key` (deleted): readers that have it keep reading; the next one opens the new object.
    fn forget(&self, key: &ObjectKey) {
        self.files().remove(key.as_str());
    }
}

/// `EMFILE` or `ENFILE`: the process or the system has no descriptor left.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23))
}

impl PackageStore {
    /// Opens the store (creating the local directory if needed). Nothing is contacted yet.
    ///
    /// # Errors
    /// [`Error::Internal`] when the directory cannot be created or the S3 settings are incomplete.
    pub fn open(settings: &StoreSettings) -> Result<Self> {
        domain::package::parse_bucket_name(&settings.bucket)?;
        for alias in &settings.bucket_aliases {
            domain::package::parse_bucket_name(alias)?;
        }
        let mut signer = None;
        let mut open_files = None;
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
                let fs = Arc::new(fs);
                open_files = Some(Arc::new(OpenFiles {
                    fs: fs.clone(),
                    files: Mutex::new(HashMap::new()),
                    max: settings.max_open_files.max(1),
                }));
                fs
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
                let s3 = Arc::new(
                    b.build()
                        .map_err(|e| Error::Internal(format!("S3 package store: {e}")))?,
                );
                signer = Some(s3.clone());
                s3
            }
        };
        Ok(Self {
            inner,
            signer,
            offload: settings.offload,
            bucket: Arc::from(settings.bucket.as_str()),
            bucket_aliases: settings.bucket_aliases.clone().into(),
            max_package_size: settings.max_package_size,
            open_files,
        })
    }

    /// A presigned `GET` URL for `key`, valid for `ttl`, when devices should fetch this package from the
    /// bucket directly: the store is S3-compatible, and the package was registered from the bucket or
    /// offload is configured. `None` means devices download from Updraft.
    ///
    /// # Errors
    /// [`Error::Storage`] when signing fails; [`Error::Validation`] for a bad key.
    pub async fn offload_url(
        &self,
        key: &ObjectKey,
        registered: bool,
        ttl: std::time::Duration,
    ) -> Result<Option<String>> {
        use object_store::signer::Signer;
        let Some(s3) = &self.signer else {
            return Ok(None);
        };
        if !(registered || self.offload) {
            return Ok(None);
        }
        let url = s3
            .signed_url(object_store::signer::Method::GET, &Self::path(key)?, ttl)
            .await?;
        Ok(Some(url.to_string()))
    }

    /// The bucket name registrations must use.
    #[must_use]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Whether a registration naming `bucket` means this store: its bucket, or one of its aliases.
    #[must_use]
    pub fn answers_to(&self, bucket: &str) -> bool {
        bucket == &*self.bucket || self.bucket_aliases.iter().any(|a| a == bucket)
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
        if let Some(files) = &self.open_files {
            return Ok(ObjectReader::File(FileChunks::new(
                files.open(key).await?,
                range,
                chunk,
            )));
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
            GetResultPayload::File(file, _) => {
                ObjectReader::File(FileChunks::new(Arc::new(file), range, chunk))
            }
            GetResultPayload::Stream(s) => ObjectReader::Stream(s),
        })
    }

    /// Deletes an object; a missing one is not an error.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        if let Some(files) = &self.open_files {
            files.forget(key);
        }
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

    /// Whether to start reading the next chunk as soon as one is returned (local files only): faster when
    /// memory allows, since the disk read overlaps sending.
    pub fn set_read_ahead(&mut self, on: bool) {
        if let Self::File(f) = self {
            f.read_ahead = on;
        }
    }

    /// Counts the bytes of every chunk read from now on in `gauge`, from the start of its read (a chunk
    /// read ahead counts while it waits) for as long as the chunk (or any slice of it) is alive, so callers
    /// can bound the memory held by chunks that are still queued for a slow reader (local files only).
    pub fn track(&mut self, gauge: Arc<AtomicUsize>) {
        if let Self::File(f) = self {
            f.gauge = Some(gauge);
        }
    }
}

/// Read buffers, recycled: a download reads thousands of chunks, and a fresh zeroed buffer for each cost
/// about a tenth of the server's CPU at full speed. Buffers come in power-of-two sizes from 4 KiB; at most
/// [`POOL_BYTES`] are kept idle.
struct BufferPool {
    /// Idle buffers per size class (`4 KiB << class`), each filled to its full length.
    idle: std::sync::Mutex<Vec<Vec<Vec<u8>>>>,
    bytes: AtomicUsize,
}

const POOL_BYTES: usize = 4 * 1024 * 1024;
const POOL_CLASSES: usize = 10;

static POOL: BufferPool = BufferPool {
    idle: std::sync::Mutex::new(Vec::new()),
    bytes: AtomicUsize::new(0),
};

impl BufferPool {
    fn class(len: usize) -> usize {
        (len.max(4096).next_power_of_two().trailing_zeros() as usize).saturating_sub(12)
    }

    /// A buffer of at least `len` bytes (its length is its size class).
    fn take(&self, len: usize) -> Vec<u8> {
        let class = Self::class(len);
        if class < POOL_CLASSES
            && let Some(buf) = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(class)
                .and_then(Vec::pop)
        {
            self.bytes.fetch_sub(buf.len(), Ordering::Relaxed);
            return buf;
        }
        vec![0; len.max(4096).next_power_of_two()]
    }

    fn give(&self, buf: Vec<u8>) {
        let class = Self::class(buf.len());
        if class >= POOL_CLASSES
            || buf.len() != 4096 << class
            || self.bytes.load(Ordering::Relaxed) + buf.len() > POOL_BYTES
        {
            return;
        }
        self.bytes.fetch_add(buf.len(), Ordering::Relaxed);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < POOL_CLASSES {
            idle.resize_with(POOL_CLASSES, Vec::new);
        }
        idle[class].push(buf);
    }
}

/// A chunk read into a pooled buffer: `buf[..filled]` are the bytes. The whole buffer is counted in
/// `gauge` (when given) until dropped, then returned to the pool.
struct Chunk {
    buf: Vec<u8>,
    filled: usize,
    gauge: Option<Arc<AtomicUsize>>,
}

impl Chunk {
    /// An empty chunk in `buf`, counted in `gauge` from now on.
    fn new(buf: Vec<u8>, gauge: Option<Arc<AtomicUsize>>) -> Self {
        if let Some(gauge) = &gauge {
            gauge.fetch_add(buf.len(), Ordering::Relaxed);
        }
        Self {
            buf,
            filled: 0,
            gauge,
        }
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.filled]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.fetch_sub(self.buf.len(), Ordering::Relaxed);
        }
        POOL.give(std::mem::take(&mut self.buf));
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

type ReadJob = tokio::task::JoinHandle<io::Result<Chunk>>;

/// Positional reads of `pos..end` from a shared file handle, one chunk at a time on the blocking pool.
pub struct FileChunks {
    file: Option<Arc<std::fs::File>>,
    pos: u64,
    end: u64,
    chunk: usize,
    pending: Option<ReadJob>,
    gauge: Option<Arc<AtomicUsize>>,
    read_ahead: bool,
}

impl FileChunks {
    /// Reads `range` of `file`, `chunk` bytes (at least 4 KiB) at a time.
    fn new(file: Arc<std::fs::File>, range: Range<u64>, chunk: usize) -> Self {
        Self {
            file: Some(file),
            pos: range.start,
            end: range.end,
            chunk: chunk.max(4096),
            pending: None,
            gauge: None,
            read_ahead: false,
        }
    }

    /// Starts reading the next chunk on the blocking pool.
    fn spawn_read(&mut self) {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.file.clone() else {
            return;
        };
        if self.pos >= self.end || self.pending.is_some() {
            return;
        }
        let len = usize::try_from(self.end - self.pos)
            .unwrap_or(usize::MAX)
            .min(self.chunk);
        let pos = self.pos;
        // The buffer counts from now: a chunk read ahead, waiting to be asked for, holds memory too.
        let mut chunk = Chunk::new(POOL.take(len), self.gauge.clone());
        self.pending = Some(tokio::task::spawn_blocking(move || {
            while chunk.filled < len {
                match file.read_at(&mut chunk.buf[chunk.filled..len], pos + chunk.filled as u64) {
                    Ok(0) => break,
                    Ok(n) => chunk.filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(chunk)
        }));
    }
}

impl Stream for FileChunks {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.pending.is_none() {
            if self.pos >= self.end || self.file.is_none() {
                return Poll::Ready(None);
            }
            self.spawn_read();
        }
        let Some(job) = self.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let result = std::task::ready!(Pin::new(job).poll(cx));
        self.pending = None;
        Poll::Ready(Some(match result {
            Ok(Ok(chunk)) if chunk.filled == 0 => {
                self.file = None;
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than recorded",
                ))
            }
            Ok(Ok(chunk)) => {
                self.pos += chunk.filled as u64;
                let chunk = Bytes::from_owner(chunk);
                // Read ahead: the next chunk is read while this one is being sent.
                if self.read_ahead {
                    self.spawn_read();
                }
                Ok(chunk)
            }
            Ok(Err(e)) => {
                self.file = None;
                Err(e)
            }
            Err(e) => {
                self.file = None;
                Err(io::Error::other(e))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_are_recycled_by_size_class() {
        assert_eq!(BufferPool::class(1), 0);
        assert_eq!(BufferPool::class(4096), 0);
        assert_eq!(BufferPool::class(4097), 1);
        assert_eq!(BufferPool::class(256 * 1024), 6);
        let pool = BufferPool {
            idle: std::sync::Mutex::new(Vec::new()),
            bytes: AtomicUsize::new(0),
        };
        let mut buf = pool.take(100_000);
        assert_eq!(buf.len(), 128 * 1024, "rounded up to its class");
        buf[0] = 7;
        let ptr = buf.as_ptr();
        pool.give(buf);
        assert_eq!(pool.bytes.load(Ordering::Relaxed), 128 * 1024);
        let again = pool.take(70_000);
        assert_eq!(
            (again.as_ptr(), again[0]),
            (ptr, 7),
            "the same buffer comes back, not a zeroed one"
        );
        assert_eq!(pool.bytes.load(Ordering::Relaxed), 0);
        pool.give(vec![0; 5000]);
        assert_eq!(
            pool.bytes.load(Ordering::Relaxed),
            0,
            "odd sizes are not kept"
        );
        for _ in 0..200 {
            pool.give(vec![0; 256 * 1024]);
        }
        assert!(
            pool.bytes.load(Ordering::Relaxed) <= POOL_BYTES,
            "the pool is bounded"
        );
    }
}
