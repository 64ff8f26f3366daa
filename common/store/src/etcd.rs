//! [`EtcdStore`]: the state store on an etcd cluster (v3 API, through
//! `etcd-client`), for coordinators on several hosts. Starting an etcd for
//! tests lives in `ringmaster-tests` (`tests/src/etcd.rs`), not here.
//!
//! # Mapping
//!
//! - A version is etcd's `mod_revision`; `put` and `txn` return the response
//!   header's revision, `range_with_revision` the header revision of the read.
//! - `Compare::Version { key, None }` is `mod_revision == 0` (etcd compares a
//!   missing key as all zeros), `Some(v)` is `mod_revision == v`;
//!   `Compare::Value { Some(v) }` is a value compare and `{ None }` is
//!   `mod_revision == 0`, since etcd's value compare fails on missing keys.
//! - Watches are etcd watches; leases are etcd leases (etcd rounds a TTL up
//!   to its minimum, 1.5 election timeouts in whole seconds).
//! - The empty prefix means every key (etcd refuses the empty key).
//!
//! # Timeouts and errors
//!
//! Every request runs under [`EtcdOptions::request_timeout`] on our side:
//! etcd-client's balanced channel waits, without a deadline, for an endpoint
//! to become ready, so a fully stopped cluster would otherwise hang the
//! caller. The client also asks etcd to refuse requests while a member has
//! no leader (`require_leader`), so quorum loss shows up as an error instead
//! of a wait.
//!
//! Within that deadline, a request whose failure maps to
//! [`StoreError::Unavailable`] (which by the rules below means nothing was
//! applied) is sent again, after 0, 10, 20, 40 ... 250 ms. This is what makes
//! the loss of one member invisible: the balanced channel keeps picking the
//! dead member's endpoint for a share of requests, and each such request
//! fails at once with a refused connection; the retry goes to another member.
//! It also rides out a leader election. Only when the deadline passes does
//! the caller see `Unavailable` (or, for a write whose last attempt timed
//! out, `Ambiguous`), so with quorum lost every request takes the full
//! `request_timeout`: coordinators that must notice quickly use a short one.
//!
//! Errors are mapped in `map_error` and `map_status`, variant by variant
//! and gRPC code by code, by what the request was:
//! - a read (get, range, watch set-up) that fails transiently is
//!   [`StoreError::Unavailable`] (retry it);
//! - a write (put, delete, txn, revoke) that may have reached etcd (our
//!   timeout elapsed, the connection broke, etcd timed out waiting for
//!   consensus or lost its leader mid-request) is [`StoreError::Ambiguous`];
//!   one that etcd provably refused before proposing it ("no leader", "not
//!   capable", "too many requests", no space, a connection that could not be
//!   opened) is `Unavailable`;
//! - lease grants, keep-alives and compactions are safe to repeat (a lease
//!   granted but never learned expires by itself), so their transient
//!   failures are `Unavailable` too;
//! - a watch overtaken by compaction ends with [`StoreError::Compacted`]
//!   (etcd reports it in the watch response, with the compaction revision);
//!   compacting at an already compacted revision is a no-op. No other request
//!   reads at a past revision, so etcd's other compaction error cannot occur;
//! - a missing lease is [`StoreError::LeaseNotFound`], requests etcd refuses
//!   by their content (`InvalidArgument`, `FailedPrecondition`, `OutOfRange`,
//!   ...) [`StoreError::InvalidRequest`], auth refusals
//!   [`StoreError::PermissionDenied`], `DataLoss` [`StoreError::Corrupt`].

use super::lease::ttl_secs;
use super::watch::check_start_revision;
use super::{
    Compare, LeaseId, Op, StateStore, StoreError, Txn, TxnOutcome, Versioned, WatchEvent,
    WatchStream, check_key,
};
use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient, LeaseClient,
    PutOptions, WatchClient, WatchOptions, WatchResponse,
};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_stream::Stream;
use tonic::Code;

/// How an [`EtcdStore`] talks to etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// The deadline of every request, set-up of a watch included. A read
    /// that runs out is `Unavailable`, a write `Ambiguous`.
    pub request_timeout: Duration,
    /// The deadline for opening a connection to one endpoint.
    pub connect_timeout: Duration,
    /// How often an HTTP/2 ping checks a connection, and how long an answer
    /// may take: how fast a silently dead member (and the watches on it) is
    /// noticed.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(3),
        }
    }
}

/// Values above etcd's default request limit (1.5 MiB) are refused by etcd;
/// reads may return many of them, so accept large responses.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A state store on an etcd cluster. Clones share the connections.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    endpoints: Vec<String>,
    options: EtcdOptions,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What a request is, which decides what a failure means; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// A write that is harmless to repeat.
    Repeatable,
}

impl EtcdStore {
    /// A client for the cluster at `endpoints` (`http://host:port` or
    /// `host:port`). Connections open lazily: this does not contact etcd, and
    /// the first request reports an unreachable cluster.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidRequest(
                "no etcd endpoints given".to_owned(),
            ));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let what = format!("connect to etcd at {}", endpoints.join(","));
        let client = match tokio::time::timeout(
            options.request_timeout,
            Client::connect(endpoints, Some(connect)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(map_error(&what, Kind::Read, None, err)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "{what}: no answer within {:?}",
                    options.request_timeout
                )));
            }
        };
        Ok(EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
            endpoints: endpoints.to_vec(),
            options,
        })
    }

    /// The endpoints this store was connected with.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends a request (made afresh by `request` for every attempt) until it
    /// succeeds, fails with anything but `Unavailable`, or the request
    /// timeout passes; see the module doc.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        kind: Kind,
        lease: Option<LeaseId>,
        mut request: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.options.request_timeout;
        let mut backoff = Duration::ZERO;
        loop {
            let err = match tokio::time::timeout_at(deadline, request()).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(err)) => map_error(what, kind, lease, err),
                Err(_) => {
                    let why = format!(
                        "{what}: etcd did not answer within {:?}",
                        self.options.request_timeout
                    );
                    return Err(match kind {
                        Kind::Write => StoreError::Ambiguous(why),
                        Kind::Read | Kind::Repeatable => StoreError::Unavailable(why),
                    });
                }
            };
            let retry_at = tokio::time::Instant::now() + backoff;
            if !matches!(err, StoreError::Unavailable(_)) || retry_at >= deadline {
                return Err(err);
            }
            tokio::time::sleep_until(retry_at).await;
            backoff = (backoff * 2).clamp(RETRY_FIRST_BACKOFF, RETRY_MAX_BACKOFF);
        }
    }
}

/// The pause before the second retry of an `Unavailable` request (the first
/// is immediate), doubled after each until [`RETRY_MAX_BACKOFF`].
const RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(10);
const RETRY_MAX_BACKOFF: Duration = Duration::from_millis(250);

/// An etcd revision as our version; etcd never sends negative ones.
fn revision(what: &str, revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision)
        .map_err(|_| StoreError::Corrupt(format!("{what}: etcd sent revision {revision}")))
}

fn header_revision(
    what: &str,
    header: Option<&etcd_client::ResponseHeader>,
) -> Result<u64, StoreError> {
    let header = header.ok_or_else(|| {
        StoreError::Internal(format!("{what}: etcd answered without a response header"))
    })?;
    revision(what, header.revision())
}

fn key_string(what: &str, kv: &KeyValue) -> Result<String, StoreError> {
    String::from_utf8(kv.key().to_vec())
        .map_err(|_| StoreError::Corrupt(format!("{what}: etcd holds a key that is not utf-8")))
}

fn versioned(what: &str, kv: &KeyValue) -> Result<Versioned, StoreError> {
    Ok(Versioned {
        value: kv.value().to_vec(),
        version: revision(what, kv.mod_revision())?,
    })
}

fn to_i64(what: &str, revision: u64) -> Result<i64, StoreError> {
    i64::try_from(revision).map_err(|_| {
        StoreError::InvalidRequest(format!(
            "{what}: revision {revision} is beyond etcd's range"
        ))
    })
}

fn compare(compare: &Compare) -> Result<etcd_client::Compare, StoreError> {
    Ok(match compare {
        Compare::Version { key, version: None } | Compare::Value { key, value: None } => {
            etcd_client::Compare::mod_revision(key.as_str(), CompareOp::Equal, 0)
        }
        Compare::Version {
            key,
            version: Some(version),
        } => etcd_client::Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            to_i64("txn compare", *version)?,
        ),
        Compare::Value {
            key,
            value: Some(value),
        } => etcd_client::Compare::value(key.as_str(), CompareOp::Equal, value.clone()),
    })
}

fn txn_op(op: Op) -> etcd_client::TxnOp {
    match op {
        Op::Put { key, value } => etcd_client::TxnOp::put(key, value, None),
        Op::PutWithLease { key, value, lease } => {
            etcd_client::TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease.0)))
        }
        Op::Delete { key } => etcd_client::TxnOp::delete(key, None),
    }
}

/// etcd's message for a revision older than its compaction point.
const COMPACTED: &str = "required revision has been compacted";

/// Messages of etcd errors with gRPC code `Unavailable` that etcd sends
/// before proposing a request, so a write that got one did not happen. Any
/// other `Unavailable` (request timed out, leader changed, server stopped, a
/// broken connection) may come after the proposal.
const REFUSED_BEFORE_PROPOSAL: [&str; 5] = [
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: unhealthy cluster",
    "etcdserver: rpc not supported for learner",
    "etcdserver: cluster version not available",
];

/// Maps an `etcd-client` error, variant by variant. `lease` names the lease
/// a `NotFound` answer is about.
fn map_error(
    what: &str,
    kind: Kind,
    lease: Option<LeaseId>,
    err: etcd_client::Error,
) -> StoreError {
    use etcd_client::Error as E;
    let transient = |msg: String| match kind {
        Kind::Write => StoreError::Ambiguous(msg),
        Kind::Read | Kind::Repeatable => StoreError::Unavailable(msg),
    };
    match err {
        E::GRpcStatus(status) => map_status(what, kind, lease, &status),
        // Raised while building the channel, before anything is sent.
        E::TransportError(err) => StoreError::Unavailable(format!("{what}: {err}")),
        E::IoError(err) => transient(format!("{what}: {err}")),
        // The client's request or response channel of a stream closed: the
        // stream broke.
        E::WatchError(msg) => transient(format!("{what}: watch stream broke: {msg}")),
        E::LeaseKeepAliveError(msg) if msg == "lease not found" => match lease {
            Some(lease) => StoreError::LeaseNotFound(lease),
            None => StoreError::Internal(format!("{what}: lease not found")),
        },
        E::LeaseKeepAliveError(msg) => {
            StoreError::Unavailable(format!("{what}: keep-alive stream broke: {msg}"))
        }
        E::InvalidArgs(msg) => StoreError::InvalidRequest(format!("{what}: {msg}")),
        E::InvalidUri(err) => StoreError::InvalidRequest(format!("{what}: bad endpoint: {err}")),
        E::EndpointError(msg) => StoreError::InvalidRequest(format!("{what}: bad endpoint: {msg}")),
        E::InvalidMetadataValue(err) => {
            StoreError::InvalidRequest(format!("{what}: bad request metadata: {err}"))
        }
        E::Utf8Error(err) => StoreError::Corrupt(format!("{what}: etcd sent bad utf-8: {err}")),
        // We use neither elections nor dynamic endpoints.
        err @ (E::ElectError(_) | E::EndpointsNotManaged | E::Internal(_)) => {
            StoreError::Internal(format!("{what}: {err}"))
        }
    }
}

/// Maps a gRPC status from etcd (or from the transport), code by code.
fn map_status(
    what: &str,
    kind: Kind,
    lease: Option<LeaseId>,
    status: &tonic::Status,
) -> StoreError {
    let msg = status.message();
    let shown = format!("{what}: {msg}{}", causes(status));
    let transient = |shown: String| match kind {
        Kind::Write => StoreError::Ambiguous(shown),
        Kind::Read | Kind::Repeatable => StoreError::Unavailable(shown),
    };
    match status.code() {
        Code::Unavailable => {
            let refused =
                REFUSED_BEFORE_PROPOSAL.iter().any(|m| msg.contains(m)) || never_connected(status);
            if refused {
                StoreError::Unavailable(shown)
            } else {
                transient(shown)
            }
        }
        // Our deadline or etcd's, a cancelled or aborted stream, an unknown
        // transport failure: the request may have been applied.
        Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => {
            transient(shown)
        }
        // Too many requests, or the space quota alarm: etcd refused before
        // proposing.
        Code::ResourceExhausted => StoreError::Unavailable(shown),
        Code::NotFound if msg.contains("requested lease not found") => match lease {
            Some(lease) => StoreError::LeaseNotFound(lease),
            None => StoreError::Internal(shown),
        },
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::NotFound
        | Code::AlreadyExists
        | Code::Unimplemented => StoreError::InvalidRequest(shown),
        Code::PermissionDenied | Code::Unauthenticated => StoreError::PermissionDenied(shown),
        Code::DataLoss => StoreError::Corrupt(shown),
        // A protocol or decoding failure on our side: the server may have
        // applied a write before we failed to read its answer.
        Code::Internal => match kind {
            Kind::Write => StoreError::Ambiguous(shown),
            Kind::Read | Kind::Repeatable => StoreError::Internal(shown),
        },
        Code::Ok => StoreError::Internal(format!("{what}: etcd failed with status ok")),
    }
}

/// The cause chain of a transport failure, as `": cause: cause"` (tonic's
/// messages alone say only "transport error").
fn causes(status: &tonic::Status) -> String {
    let mut shown = String::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = cause {
        let text = err.to_string();
        if !shown.ends_with(&text) && !status.message().ends_with(&text) {
            shown.push_str(": ");
            shown.push_str(&text);
        }
        cause = err.source();
    }
    shown
}

/// Whether a transport failure happened while connecting (so nothing was
/// sent): an `io::Error` of kind `ConnectionRefused` somewhere in the cause
/// chain.
fn never_connected(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cause = err.source();
    }
    false
}

#[async_trait]
impl StateStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let what = format!("get {key:?}");
        let resp = self
            .call(&what, Kind::Read, None, || {
                let mut kv = self.kv.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| versioned(&what, kv))
            .transpose()
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let what = format!("put {key:?}");
        let resp = self
            .call(&what, Kind::Write, None, || {
                let (mut kv, value) = (self.kv.clone(), value.clone());
                async move { kv.put(key, value, None).await }
            })
            .await?;
        header_revision(&what, resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let what = format!("delete {key:?}");
        let resp = self
            .call(&what, Kind::Write, None, || {
                let mut kv = self.kv.clone();
                async move { kv.delete(key, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn range_with_revision(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, u64), StoreError> {
        let what = format!("range {prefix:?}");
        let options = if prefix.is_empty() {
            GetOptions::new().with_all_keys()
        } else {
            GetOptions::new().with_prefix()
        };
        let resp = self
            .call(&what, Kind::Read, None, || {
                let (mut kv, options) = (self.kv.clone(), options.clone());
                async move { kv.get(prefix, Some(options)).await }
            })
            .await?;
        let revision = header_revision(&what, resp.header())?;
        let found = resp
            .kvs()
            .iter()
            .map(|kv| Ok((key_string(&what, kv)?, versioned(&what, kv)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok((found, revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        // etcd's "lease not found" does not say which lease: report the
        // first one the txn binds a key to.
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::PutWithLease { lease, .. } => Some(*lease),
                Op::Put { .. } | Op::Delete { .. } => None,
            });
        let compares = txn
            .compares
            .iter()
            .map(compare)
            .collect::<Result<Vec<_>, _>>()?;
        let request = etcd_client::Txn::new()
            .when(compares)
            .and_then(txn.success.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(txn_op).collect::<Vec<_>>());
        let resp = self
            .call("txn", Kind::Write, lease, || {
                let (mut kv, request) = (self.kv.clone(), request.clone());
                async move { kv.txn(request).await }
            })
            .await?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: header_revision("txn", resp.header())?,
        })
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<u64, StoreError> {
        check_key(key)?;
        let what = format!("put {key:?} with lease {lease}");
        let resp = self
            .call(&what, Kind::Write, Some(lease), || {
                let (mut kv, value) = (self.kv.clone(), value.clone());
                let options = PutOptions::new().with_lease(lease.0);
                async move { kv.put(key, value, Some(options)).await }
            })
            .await?;
        header_revision(&what, resp.header())
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, StoreError> {
        check_start_revision(start_revision)?;
        let what = format!("watch {prefix:?}");
        let mut options = if prefix.is_empty() {
            WatchOptions::new().with_all_keys()
        } else {
            WatchOptions::new().with_prefix()
        };
        if let Some(start) = start_revision {
            options = options.with_start_revision(to_i64(&what, start)?);
        }
        // Wait for etcd to confirm the watch, so that a watch from "now"
        // sees every write made after this call returns.
        let (stream, created, early) = self
            .call(&what, Kind::Read, None, || {
                let (mut client, options) = (self.watch.clone(), options.clone());
                async move {
                    let mut stream = client.watch(prefix, Some(options)).await?;
                    let mut early = Vec::new();
                    loop {
                        match stream.message().await? {
                            Some(resp) if resp.created() => return Ok((stream, resp, early)),
                            Some(resp) => early.push(resp),
                            None => {
                                return Err(etcd_client::Error::WatchError(
                                    "etcd closed the stream before creating the watch".to_owned(),
                                ));
                            }
                        }
                    }
                }
            })
            .await?;
        let created_at = header_revision(&what, created.header())?;
        let mut watch = EtcdWatch {
            stream: Box::pin(stream),
            what,
            pending: VecDeque::new(),
            next_revision: start_revision.unwrap_or(created_at + 1),
            done: false,
        };
        for resp in early.into_iter().chain([created]) {
            watch.absorb(resp);
        }
        Ok(WatchStream::new(watch))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let what = format!("compact at {revision}");
        let at = to_i64(&what, revision)?;
        let request = || {
            let mut kv = self.kv.clone();
            async move {
                match kv.compact(at, None).await {
                    // Already compacted at or past it: nothing to do.
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.code() == Code::OutOfRange
                            && status.message().contains(COMPACTED) =>
                    {
                        Ok(())
                    }
                    other => other.map(|_| ()),
                }
            }
        };
        self.call(&what, Kind::Repeatable, None, request).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl_secs(ttl)?;
        let what = format!("grant a lease of {secs} s");
        let resp = self
            .call(&what, Kind::Repeatable, None, || {
                let mut client = self.lease.clone();
                async move { client.grant(secs, None).await }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Unavailable(format!("{what}: {}", resp.error())));
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let what = format!("keep lease {lease} alive");
        // etcd-client's keep-alive stream swallows the first answer's TTL, so
        // refresh twice on the one stream and read the second answer.
        let ttl = self
            .call(&what, Kind::Repeatable, Some(lease), || {
                let mut client = self.lease.clone();
                async move {
                    let (mut keeper, mut stream) = client.keep_alive(lease.0).await?;
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(resp) if resp.ttl() > 0 => Ok(resp.ttl()),
                        Some(_) => Err(etcd_client::Error::LeaseKeepAliveError(
                            "lease not found".to_owned(),
                        )),
                        None => Err(etcd_client::Error::LeaseKeepAliveError(
                            "etcd closed the keep-alive stream".to_owned(),
                        )),
                    }
                }
            })
            .await?;
        Ok(Duration::from_secs(ttl.unsigned_abs()))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let what = format!("revoke lease {lease}");
        self.call(&what, Kind::Write, Some(lease), || {
            let mut client = self.lease.clone();
            async move { client.revoke(lease.0).await }
        })
        .await?;
        Ok(())
    }
}

/// An etcd watch as a stream of [`WatchEvent`]s. Dropping it drops the gRPC
/// stream, which cancels the watch in etcd.
struct EtcdWatch {
    stream: Pin<Box<etcd_client::WatchStream>>,
    what: String,
    /// Events of a response not handed out yet, or the error that ends the
    /// stream.
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    /// The revision to resume from, which a compaction error reports.
    next_revision: u64,
    done: bool,
}

impl EtcdWatch {
    /// Queues the events (or the ending error) of one response.
    fn absorb(&mut self, resp: WatchResponse) {
        if self.done {
            return;
        }
        if resp.compact_revision() > 0 {
            self.end(match revision(&self.what, resp.compact_revision()) {
                Ok(compacted) => StoreError::Compacted {
                    requested: self.next_revision,
                    compacted,
                },
                Err(err) => err,
            });
            return;
        }
        for event in resp.events() {
            match self.event(event) {
                Ok(event) => {
                    self.next_revision = event.version();
                    self.pending.push_back(Ok(event));
                }
                Err(err) => {
                    self.end(err);
                    return;
                }
            }
        }
        if resp.canceled() {
            let reason = resp.cancel_reason();
            let err = if REFUSED_BEFORE_PROPOSAL.iter().any(|m| reason.contains(m)) {
                StoreError::Unavailable(format!("{}: {reason}", self.what))
            } else {
                StoreError::Unavailable(format!(
                    "{}: etcd cancelled the watch: {reason}",
                    self.what
                ))
            };
            self.end(err);
        }
    }

    fn event(&self, event: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let kv = event.kv().ok_or_else(|| {
            StoreError::Corrupt(format!("{}: etcd sent an event without a key", self.what))
        })?;
        let key = key_string(&self.what, kv)?;
        let version = revision(&self.what, kv.mod_revision())?;
        Ok(match event.event_type() {
            EventType::Put => WatchEvent::Put {
                key,
                value: kv.value().to_vec(),
                version,
            },
            EventType::Delete => WatchEvent::Delete { key, version },
        })
    }

    fn end(&mut self, err: StoreError) {
        self.pending.push_back(Err(err));
        self.done = true;
    }
}

impl Stream for EtcdWatch {
    type Item = Result<WatchEvent, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(item) = this.pending.pop_front() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.stream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(resp))) => this.absorb(resp),
                Poll::Ready(Some(Err(err))) => {
                    let err = map_error(&this.what, Kind::Read, None, err);
                    this.end(err);
                }
                Poll::Ready(None) => {
                    let err =
                        StoreError::Unavailable(format!("{}: etcd closed the watch", this.what));
                    this.end(err);
                }
            }
        }
    }
}
