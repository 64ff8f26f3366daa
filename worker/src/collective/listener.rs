//! The data-plane listener: the one TCP port a worker process opens for collective traffic, both
//! halves of the connection handshake, and generation fencing.
//!
//! Not here: the collective operations that run over accepted connections (`ring.rs`), and anything
//! about the control plane. The listener learns jobs and generations only from
//! `RingCollective::connect`, which registers what it expects before dialling.
//!
//! Handshake, sent by the dialer right after the TCP connect (integers little-endian):
//!
//! ```text
//! magic "RMDP" | version u16 | job id length u16 | generation u64 | sender rank u32 | world size u32 | job id (utf-8)
//! ```
//!
//! The listener answers one byte ([`Reply`]). A connection is handed to a ring only after an
//! `Accepted` reply; every other reply is followed by a close. Fencing: a handshake whose
//! generation is older than the newest one this listener was asked to join for that job is
//! refused with `StaleGeneration`, and registering an older generation locally fails the same way.

use super::{CollectiveError, RefuseReason, lock_ignoring_poison};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const MAGIC: [u8; 4] = *b"RMDP";
/// Bumped on any change to the handshake or to the op stream of `ring.rs`.
pub(crate) const PROTOCOL_VERSION: u16 = 1;
/// Longest job id the handshake carries, in bytes; bounds what a stranger can make us read.
pub const MAX_JOB_ID_LEN: usize = 256;
const HELLO_FIXED_LEN: usize = 4 + 2 + 2 + 8 + 4 + 4;
/// How long an accepted TCP connection may take to send its handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes read concurrently; connections beyond this are closed unread.
const MAX_HANDSHAKES_IN_FLIGHT: usize = 64;
const DIAL_BACKOFF_START: Duration = Duration::from_millis(5);
const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// The listener's one-byte answer to a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Reply {
    Accepted = 0,
    StaleGeneration = 1,
    /// The job or generation is not registered here yet: the peer may simply be ahead of us, so
    /// the dialer retries until its connect timeout.
    NotReady = 2,
    WorldSizeMismatch = 3,
    UnexpectedRank = 4,
    VersionMismatch = 5,
}

impl Reply {
    fn from_byte(b: u8) -> Option<Reply> {
        Some(match b {
            0 => Reply::Accepted,
            1 => Reply::StaleGeneration,
            2 => Reply::NotReady,
            3 => Reply::WorldSizeMismatch,
            4 => Reply::UnexpectedRank,
            5 => Reply::VersionMismatch,
            _ => return None,
        })
    }
}

/// Who is dialling, for which job and generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub job: String,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
}

/// Why a handshake could not be read.
#[derive(Debug)]
enum HelloError {
    /// Closed, timed out or reset before a whole handshake arrived.
    Io(io::Error),
    /// Not our protocol at all; closed without a reply.
    BadMagic,
    /// Our protocol, another version: worth telling the dialer.
    Version(u16),
    /// Job id too long or not utf-8.
    BadJobId,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let job = self.job.as_bytes();
        let mut out = Vec::with_capacity(HELLO_FIXED_LEN + job.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        // Lengths above MAX_JOB_ID_LEN are rejected by `RingCollective::connect` before dialling.
        out.extend_from_slice(&(job.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.world_size.to_le_bytes());
        out.extend_from_slice(job);
        out
    }

    fn read_from(r: &mut impl Read) -> Result<Hello, HelloError> {
        let mut fixed = [0u8; HELLO_FIXED_LEN];
        r.read_exact(&mut fixed).map_err(HelloError::Io)?;
        let (magic, rest) = fixed.split_at(4);
        if magic != MAGIC {
            return Err(HelloError::BadMagic);
        }
        let (version, rest) = take_u16(rest);
        if version != PROTOCOL_VERSION {
            return Err(HelloError::Version(version));
        }
        let (job_len, rest) = take_u16(rest);
        let (generation, rest) = take_u64(rest);
        let (rank, rest) = take_u32(rest);
        let (world_size, _) = take_u32(rest);
        let job_len = usize::from(job_len);
        if job_len == 0 || job_len > MAX_JOB_ID_LEN {
            return Err(HelloError::BadJobId);
        }
        let mut job = vec![0u8; job_len];
        r.read_exact(&mut job).map_err(HelloError::Io)?;
        let job = String::from_utf8(job).map_err(|_| HelloError::BadJobId)?;
        Ok(Hello {
            job,
            generation,
            rank,
            world_size,
        })
    }
}

fn take_u16(b: &[u8]) -> (u16, &[u8]) {
    let (head, rest) = b.split_at(2);
    (u16::from_le_bytes([head[0], head[1]]), rest)
}

fn take_u32(b: &[u8]) -> (u32, &[u8]) {
    let (head, rest) = b.split_at(4);
    let mut a = [0u8; 4];
    a.copy_from_slice(head);
    (u32::from_le_bytes(a), rest)
}

fn take_u64(b: &[u8]) -> (u64, &[u8]) {
    let (head, rest) = b.split_at(8);
    let mut a = [0u8; 8];
    a.copy_from_slice(head);
    (u64::from_le_bytes(a), rest)
}

/// The worker's data-plane port. Bind one per process at start and reuse it for every job and
/// generation; `RingCollective::connect` borrows it to receive its predecessor's connection.
///
/// An accept thread reads each connection's handshake and decides at once: a connection the
/// listener was told to expect is parked until its ring claims it, every other one gets a reject
/// reply and is closed. Dropping the listener stops the accept thread; rings already formed keep
/// their connections. It serves any number of jobs, but one rank per job: a process hosting
/// several ranks of the same job needs a listener per rank.
pub struct DataPlaneListener {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    registry: Mutex<Registry>,
    /// Signalled when a connection is parked in `Registry::accepted` or a generation is superseded.
    changed: Condvar,
    closing: AtomicBool,
    handshakes_in_flight: AtomicUsize,
}

#[derive(Default)]
struct Registry {
    jobs: HashMap<String, JobSlot>,
    /// Accepted connections awaiting their ring. At most one per job: each job expects a single
    /// predecessor at a time.
    accepted: HashMap<ConnKey, TcpStream>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConnKey {
    job: String,
    generation: u64,
    from_rank: u32,
}

struct JobSlot {
    /// Newest generation this process was asked to join; handshakes for older ones are refused.
    newest: u64,
    /// The predecessor connection the newest generation still waits for.
    expecting: Option<Expectation>,
}

#[derive(Debug, Clone, Copy)]
struct Expectation {
    generation: u64,
    world_size: u32,
    from_rank: u32,
}

impl Registry {
    /// The reply to a handshake, given what this process has registered. Pure, so the fencing
    /// rules read in one place.
    fn decide(&self, hello: &Hello) -> Reply {
        let Some(slot) = self.jobs.get(&hello.job) else {
            return Reply::NotReady;
        };
        if hello.generation < slot.newest {
            return Reply::StaleGeneration;
        }
        if hello.generation > slot.newest {
            return Reply::NotReady;
        }
        match slot.expecting {
            Some(e) if e.generation == hello.generation => {
                if e.world_size != hello.world_size {
                    Reply::WorldSizeMismatch
                } else if e.from_rank != hello.rank {
                    Reply::UnexpectedRank
                } else {
                    Reply::Accepted
                }
            }
            // Already connected, or a single-rank generation that expects nobody.
            _ => Reply::UnexpectedRank,
        }
    }
}

impl DataPlaneListener {
    /// Binds `addr` (e.g. `0.0.0.0:7000`, or `127.0.0.1:0` for an ephemeral port) and starts the
    /// accept thread.
    pub fn bind(addr: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
            handshakes_in_flight: AtomicUsize::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("rm-dataplane-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(DataPlaneListener {
            shared,
            local_addr,
            accept_thread: Some(accept_thread),
        })
    }

    /// The bound address (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Records that this process joins `generation` of `job` and, for multi-rank generations,
    /// that it expects a connection from `from_rank`. Refuses a generation older than one
    /// already registered for the job; drops connections parked for older generations.
    pub(crate) fn register(
        &self,
        job: &str,
        generation: u64,
        world_size: u32,
        from_rank: Option<u32>,
    ) -> Result<(), CollectiveError> {
        let mut reg = lock_ignoring_poison(&self.shared.registry);
        if let Some(slot) = reg.jobs.get(job)
            && generation < slot.newest
        {
            return Err(CollectiveError::StaleGeneration {
                job: job.to_owned(),
                generation,
            });
        }
        reg.jobs.insert(
            job.to_owned(),
            JobSlot {
                newest: generation,
                expecting: from_rank.map(|from_rank| Expectation {
                    generation,
                    world_size,
                    from_rank,
                }),
            },
        );
        reg.accepted
            .retain(|k, _| k.job != job || k.generation >= generation);
        drop(reg);
        // A connect() still waiting for an older generation must learn it was superseded.
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until the expected connection from `from_rank` has been accepted, and takes it.
    pub(crate) fn take_accepted(
        &self,
        job: &str,
        generation: u64,
        from_rank: u32,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<TcpStream, CollectiveError> {
        let key = ConnKey {
            job: job.to_owned(),
            generation,
            from_rank,
        };
        let mut reg = lock_ignoring_poison(&self.shared.registry);
        loop {
            if let Some(stream) = reg.accepted.remove(&key) {
                return Ok(stream);
            }
            if reg.jobs.get(job).is_some_and(|s| s.newest > generation) {
                return Err(CollectiveError::StaleGeneration {
                    job: job.to_owned(),
                    generation,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CollectiveError::Timeout {
                    rank: from_rank,
                    after: timeout,
                });
            }
            reg = self
                .shared
                .changed
                .wait_timeout(reg, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Forgets what `connect` registered for `generation` after it failed, so a late predecessor
    /// is refused instead of parked forever.
    pub(crate) fn withdraw(&self, job: &str, generation: u64) {
        let mut reg = lock_ignoring_poison(&self.shared.registry);
        if let Some(slot) = reg.jobs.get_mut(job)
            && slot.expecting.is_some_and(|e| e.generation == generation)
        {
            slot.expecting = None;
        }
        reg.accepted
            .retain(|k, _| k.job != job || k.generation != generation);
    }
}

impl Drop for DataPlaneListener {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // `accept` cannot be interrupted portably; a connection to ourselves wakes it up to see
        // the flag.
        let wake = wake_addr(self.local_addr);
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        if let Some(t) = self.accept_thread.take()
            && woke
        {
            let _ = t.join();
        }
    }
}

/// Where to connect to reach a listener bound to `addr` (a wildcard address is reached on
/// loopback).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Decrements the in-flight handshake count however the handshake thread ends (or fails to
/// start).
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.handshakes_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "data-plane accept failed");
                // Out of descriptors and the like: do not spin while the condition lasts.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.handshakes_in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES_IN_FLIGHT {
            shared.handshakes_in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("too many data-plane handshakes in flight; closing a connection");
            continue;
        }
        let guard = InFlight(Arc::clone(&shared));
        let spawned = thread::Builder::new()
            .name("rm-dataplane-hello".into())
            .spawn(move || {
                handshake(stream, &guard.0);
                drop(guard);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a data-plane handshake thread");
        }
    }
}

/// Reads one handshake, answers it, and parks the connection if it was expected.
fn handshake(mut stream: TcpStream, shared: &Shared) {
    if stream.set_read_timeout(Some(HELLO_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(HELLO_TIMEOUT)).is_err()
    {
        return;
    }
    let hello = match Hello::read_from(&mut stream) {
        Ok(h) => h,
        Err(HelloError::Version(v)) => {
            tracing::warn!(
                version = v,
                "data-plane peer speaks another protocol version"
            );
            let _ = stream.write_all(&[Reply::VersionMismatch as u8]);
            return;
        }
        Err(HelloError::Io(e)) => {
            tracing::debug!(error = %e, "data-plane connection closed during its handshake");
            return;
        }
        Err(e) => {
            tracing::debug!(error = ?e, "dropping a data-plane connection with a bad handshake");
            return;
        }
    };
    let mut reg = lock_ignoring_poison(&shared.registry);
    let reply = reg.decide(&hello);
    // One byte into a fresh socket's empty send buffer does not block, so answering under the
    // lock is cheap and keeps the decision and the parking atomic.
    if stream.write_all(&[reply as u8]).is_err() || reply != Reply::Accepted {
        if reply != Reply::Accepted {
            tracing::debug!(job = %hello.job, generation = hello.generation, rank = hello.rank,
                ?reply, "refused a data-plane connection");
        }
        return;
    }
    if stream.set_read_timeout(None).is_err() || stream.set_write_timeout(None).is_err() {
        return;
    }
    if let Some(slot) = reg.jobs.get_mut(&hello.job) {
        slot.expecting = None;
    }
    reg.accepted.insert(
        ConnKey {
            job: hello.job,
            generation: hello.generation,
            from_rank: hello.rank,
        },
        stream,
    );
    drop(reg);
    shared.changed.notify_all();
}

/// How one dial attempt ended.
enum Attempt {
    Connected(TcpStream),
    /// Worth another try before the deadline (nobody listening yet, peer not ready, reset).
    Retry(io::Error),
    Failed(CollectiveError),
}

/// Dials `addr` (rank `to_rank`) and completes the handshake, retrying with backoff until
/// `deadline`: the peer process may not have been told about this generation yet.
pub(crate) fn dial(
    addr: &str,
    to_rank: u32,
    hello: &Hello,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CollectiveError> {
    let encoded = hello.encode();
    let mut backoff = DIAL_BACKOFF_START;
    loop {
        let now = Instant::now();
        let last = if now >= deadline {
            io::Error::new(io::ErrorKind::TimedOut, "connect timeout is zero")
        } else {
            match dial_once(addr, to_rank, hello, &encoded, deadline - now) {
                Attempt::Connected(s) => return Ok(s),
                Attempt::Failed(e) => return Err(e),
                Attempt::Retry(e) => e,
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(CollectiveError::Unreachable {
                rank: to_rank,
                addr: addr.to_owned(),
                after: timeout,
                source: last,
            });
        }
        thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}

fn dial_once(
    addr: &str,
    to_rank: u32,
    hello: &Hello,
    encoded: &[u8],
    remaining: Duration,
) -> Attempt {
    let resolved = match addr.to_socket_addrs() {
        Ok(mut it) => it.next(),
        Err(e) => return Attempt::Retry(e),
    };
    let Some(sa) = resolved else {
        return Attempt::Retry(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        ));
    };
    let mut stream = match TcpStream::connect_timeout(&sa, remaining) {
        Ok(s) => s,
        Err(e) => return Attempt::Retry(e),
    };
    let mut reply = [0u8; 1];
    let io = (|| {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(remaining))?;
        stream.set_read_timeout(Some(remaining))?;
        stream.write_all(encoded)?;
        stream.read_exact(&mut reply)?;
        stream.set_write_timeout(None)?;
        stream.set_read_timeout(None)
    })();
    if let Err(e) = io {
        return Attempt::Retry(e);
    }
    let refused = |reason| {
        Attempt::Failed(CollectiveError::Refused {
            rank: to_rank,
            reason,
        })
    };
    match Reply::from_byte(reply[0]) {
        Some(Reply::Accepted) => Attempt::Connected(stream),
        Some(Reply::NotReady) => Attempt::Retry(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "peer has not joined this generation yet",
        )),
        Some(Reply::StaleGeneration) => Attempt::Failed(CollectiveError::StaleGeneration {
            job: hello.job.clone(),
            generation: hello.generation,
        }),
        Some(Reply::WorldSizeMismatch) => refused(RefuseReason::WorldSizeMismatch),
        Some(Reply::UnexpectedRank) => refused(RefuseReason::UnexpectedRank),
        Some(Reply::VersionMismatch) => refused(RefuseReason::VersionMismatch),
        None => Attempt::Failed(CollectiveError::Protocol {
            rank: to_rank,
            detail: format!("unknown handshake reply {}", reply[0]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(job: &str, generation: u64, rank: u32, world_size: u32) -> Hello {
        Hello {
            job: job.into(),
            generation,
            rank,
            world_size,
        }
    }

    #[test]
    fn hello_round_trips() {
        let h = hello("job-ä", 7, 3, 4);
        let bytes = h.encode();
        assert_eq!(bytes.len(), HELLO_FIXED_LEN + "job-ä".len());
        let back = Hello::read_from(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn hello_rejects_bad_input() {
        let good = hello("j", 1, 0, 2).encode();

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            Hello::read_from(&mut bad_magic.as_slice()),
            Err(HelloError::BadMagic)
        ));

        let mut bad_version = good.clone();
        bad_version[4] = 99;
        assert!(matches!(
            Hello::read_from(&mut bad_version.as_slice()),
            Err(HelloError::Version(99))
        ));

        let mut too_long = good.clone();
        too_long[6..8].copy_from_slice(&((MAX_JOB_ID_LEN + 1) as u16).to_le_bytes());
        assert!(matches!(
            Hello::read_from(&mut too_long.as_slice()),
            Err(HelloError::BadJobId)
        ));

        let mut not_utf8 = good.clone();
        *not_utf8.last_mut().unwrap() = 0xff;
        assert!(matches!(
            Hello::read_from(&mut not_utf8.as_slice()),
            Err(HelloError::BadJobId)
        ));

        let truncated = &good[..good.len() - 1];
        assert!(matches!(
            Hello::read_from(&mut &truncated[..]),
            Err(HelloError::Io(_))
        ));
    }

    #[test]
    fn fencing_decisions() {
        let mut reg = Registry::default();
        assert_eq!(reg.decide(&hello("j", 5, 1, 3)), Reply::NotReady);
        reg.jobs.insert(
            "j".into(),
            JobSlot {
                newest: 5,
                expecting: Some(Expectation {
                    generation: 5,
                    world_size: 3,
                    from_rank: 1,
                }),
            },
        );
        let check = |h: Hello, want: Reply| assert_eq!(reg.decide(&h), want, "{h:?}");
        check(hello("j", 5, 1, 3), Reply::Accepted);
        check(hello("j", 4, 1, 3), Reply::StaleGeneration);
        check(hello("j", 6, 1, 3), Reply::NotReady);
        check(hello("j", 5, 1, 4), Reply::WorldSizeMismatch);
        check(hello("j", 5, 2, 3), Reply::UnexpectedRank);
        check(hello("other", 5, 1, 3), Reply::NotReady);
    }
}
