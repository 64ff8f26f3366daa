//! The NCCL backend: gradients reduced in place in device memory through cudarc's NCCL bindings,
//! loaded at run time (the build needs no CUDA; see [`library`] for how the library is found).
//!
//! One communicator per generation. The generation's ring (TCP) forms first, through the
//! data plane's generation-fenced handshake; rank 0 then creates the NCCL unique id and
//! broadcasts it over that ring ([`rendezvous`]), every rank initialises the communicator, and
//! the ring stays as the group's control channel (byte broadcasts, barriers, CPU tensors). A
//! stale generation cannot join: it never gets through the ring's handshake, and the
//! rendezvous restates job and generation.
//!
//! Ordering with libtorch: tch does not expose libtorch's current stream, and libtorch uses the
//! legacy default stream unless told otherwise, so NCCL kernels are enqueued on that same
//! default stream, after the backward kernels and before the optimizer's, with no extra event.
//! Each operation then waits for the stream, so that a hung or failed collective is noticed:
//! a watchdog aborts the communicator (`ncclCommAbort`, cudarc's `result` layer, since its safe
//! wrapper has no abort) once `[fault] collective_timeout_secs` pass, which makes the waiting
//! kernels return; the rank reports a timeout and the group re-forms with a new communicator.
//! An aborted communicator is freed by NCCL and never destroyed again.

pub mod library;
pub mod rendezvous;

use super::ring::RingConfig;
use super::{AbortHandle, Collective, CollectiveError, DataPlaneListener, RingBackend};
use cudarc::nccl::{result as nccl, sys};
use cudarc::runtime::result as cudart;
use rendezvous::Rendezvous;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Element type of gradient all-reduces on the wire (`train.allreduce_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDtype {
    /// Reduce in fp32: bit-for-bit what the ring computes, up to summation order.
    F32,
    /// Round to bf16 for the reduction (half the bytes), back to fp32 after.
    Bf16,
}

/// What an NCCL group needs beyond the ring's configuration.
#[derive(Debug, Clone, Copy)]
pub struct NcclOptions {
    /// CUDA ordinal of this rank's device.
    pub device: i32,
    /// How long one operation (or the communicator's initialisation) may take before the
    /// communicator is aborted.
    pub timeout: Duration,
    /// Element type of all-reduces.
    pub wire: WireDtype,
}

/// NCCL's version code (e.g. 22809) from the loaded library.
pub fn nccl_version() -> Result<i32, CollectiveError> {
    nccl::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e.0))
}

/// The communicator, shared with the abort hook and the watchdog; `None` once aborted.
struct Slot {
    comm: Mutex<Option<RawComm>>,
}

/// `ncclComm_t` is a pointer NCCL allows to be used from any thread, one call at a time (the
/// slot's mutex), and aborted from another thread while kernels run.
struct RawComm(sys::ncclComm_t);
// SAFETY: see the type's doc; every use goes through `Slot::comm`.
#[allow(unsafe_code)]
unsafe impl Send for RawComm {}

impl Slot {
    /// Aborts the communicator if it is still there. Idempotent.
    fn abort(&self) {
        let taken = super::lock_ignoring_poison(&self.comm).take();
        if let Some(c) = taken {
            // SAFETY: `c` came from a successful init and is neither aborted nor destroyed
            // (it was in the slot). NCCL frees it; it is never used again.
            #[allow(unsafe_code)]
            let r = unsafe { nccl::comm_abort(c.0) };
            if let Err(e) = r {
                tracing::warn!(code = ?e.0, "ncclCommAbort reported an error");
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let taken = self.comm.get_mut().map(Option::take).unwrap_or(None);
        if let Some(c) = taken {
            // SAFETY: as in `abort`; every operation on it has been waited for.
            #[allow(unsafe_code)]
            let r = unsafe { nccl::comm_destroy(c.0) };
            if let Err(e) = r {
                tracing::warn!(code = ?e.0, "ncclCommDestroy reported an error");
            }
        }
    }
}

/// An NCCL communicator for one generation, over the generation's ring.
pub struct NcclBackend {
    ring: RingBackend,
    slot: Arc<Slot>,
    watchdog: Watchdog,
    opts: NcclOptions,
    poisoned: Option<String>,
    /// fp32 → bf16 → fp32 conversion buffer for `WireDtype::Bf16`.
    wire_buf: Option<Tensor>,
}

impl std::fmt::Debug for NcclBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclBackend")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("generation", &self.generation())
            .field("opts", &self.opts)
            .finish()
    }
}

impl NcclBackend {
    /// Joins the ring of the generation, exchanges the NCCL unique id over it and initialises
    /// this rank's communicator on `opts.device`.
    pub fn connect(
        listener: &DataPlaneListener,
        cfg: RingConfig,
        opts: NcclOptions,
    ) -> Result<NcclBackend, CollectiveError> {
        let (job, generation) = (cfg.job_id.clone(), cfg.generation);
        let mut ring = RingBackend::connect(listener, cfg)?;
        let (rank, world) = (ring.rank(), ring.world_size());
        let version = nccl_version()?;
        let mut msg = Vec::new();
        if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e.0))?;
            msg = Rendezvous {
                job: job.clone(),
                generation,
                world_size: world,
                nccl_version: version,
                unique_id: id.internal.iter().map(|&c| c as u8).collect(),
            }
            .encode();
        }
        ring.broadcast_bytes(&mut msg, 0, rendezvous::MAX_LEN)?;
        let id = Rendezvous::accept(&msg, &job, generation, world, version)?;
        let comm = init_comm(id, rank, world, opts)?;
        let slot = Arc::new(Slot {
            comm: Mutex::new(Some(comm)),
        });
        let weak: Weak<Slot> = Arc::downgrade(&slot);
        ring.abort_handle().on_abort(Box::new(move || {
            if let Some(s) = weak.upgrade() {
                s.abort();
            }
        }));
        tracing::info!(
            rank,
            world,
            device = opts.device,
            nccl = %library::version_text(version),
            "NCCL communicator ready"
        );
        Ok(NcclBackend {
            ring,
            watchdog: Watchdog::start(Arc::downgrade(&slot)),
            slot,
            opts,
            poisoned: None,
            wire_buf: None,
        })
    }

    /// Checks that `flat` is a flat fp32 tensor on this rank's device.
    fn check_device_flat(&self, flat: &Tensor) -> Result<(), CollectiveError> {
        if flat.kind() != Kind::Float || flat.dim() != 1 || !flat.is_contiguous() {
            return Err(CollectiveError::InvalidArgument(format!(
                "collectives take contiguous 1-D fp32 tensors, got {:?} of shape {:?}",
                flat.kind(),
                flat.size()
            )));
        }
        if flat.device() != Device::Cuda(self.opts.device as usize) {
            return Err(CollectiveError::InvalidArgument(format!(
                "the NCCL communicator is on cuda:{}, the tensor on {:?}",
                self.opts.device,
                flat.device()
            )));
        }
        Ok(())
    }

    /// Enqueues one NCCL call on the default stream and waits for it under the watchdog.
    fn run(
        &mut self,
        op: &'static str,
        enqueue: impl FnOnce(sys::ncclComm_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        if let Some(cause) = &self.poisoned {
            return Err(CollectiveError::Poisoned {
                cause: cause.clone(),
            });
        }
        let result = self.enqueue_and_wait(op, enqueue);
        if let Err(e) = &result {
            self.poisoned = Some(e.to_string());
        }
        result
    }

    fn enqueue_and_wait(
        &mut self,
        op: &'static str,
        enqueue: impl FnOnce(sys::ncclComm_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        cudart::device::set(self.opts.device).map_err(|e| cuda_error("cudaSetDevice", &e))?;
        {
            let guard = super::lock_ignoring_poison(&self.slot.comm);
            let Some(comm) = guard.as_ref() else {
                return Err(CollectiveError::Aborted);
            };
            enqueue(comm.0).map_err(|e| nccl_error(op, e.0))?;
        }
        let armed = self.watchdog.arm(self.opts.timeout);
        // SAFETY: the null stream is the legacy default stream, which always exists.
        #[allow(unsafe_code)]
        let waited = unsafe { cudart::stream::synchronize(std::ptr::null_mut()) };
        let fired = self.watchdog.disarm(armed);
        if fired {
            return Err(CollectiveError::DeviceTimeout {
                op,
                after: self.opts.timeout,
            });
        }
        if self.ring.abort_handle().is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        waited.map_err(|e| cuda_error("waiting for the NCCL kernels", &e))?;
        self.async_error(op)
    }

    /// An error a peer's failure left in the communicator (`ncclCommGetAsyncError`).
    fn async_error(&self, op: &'static str) -> Result<(), CollectiveError> {
        let guard = super::lock_ignoring_poison(&self.slot.comm);
        let Some(comm) = guard.as_ref() else {
            return Err(CollectiveError::Aborted);
        };
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (held under the slot's lock) and a valid out pointer.
        #[allow(unsafe_code)]
        let r = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
        r.result()
            .map_err(|e| nccl_error("ncclCommGetAsyncError", e.0))?;
        match state {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            other => Err(nccl_error(op, other)),
        }
    }
}

impl Collective for NcclBackend {
    fn rank(&self) -> u32 {
        self.ring.rank()
    }

    fn world_size(&self) -> u32 {
        self.ring.world_size()
    }

    fn generation(&self) -> u64 {
        self.ring.generation()
    }

    fn all_reduce_sum(&mut self, flat: &mut Tensor) -> Result<(), CollectiveError> {
        if flat.device() == Device::Cpu {
            // Small host tensors (evaluation counts): not worth a device round trip.
            return self.ring.all_reduce_sum(flat);
        }
        self.check_device_flat(flat)?;
        let count = flat.numel();
        if count == 0 {
            return Ok(());
        }
        match self.opts.wire {
            WireDtype::F32 => {
                let ptr = flat.data_ptr();
                self.all_reduce_in_place(ptr, count, sys::ncclDataType_t::ncclFloat32)
            }
            WireDtype::Bf16 => {
                let mut buf = self.wire_buffer(count)?;
                buf.f_copy_(flat)
                    .map_err(device_error("rounding to bf16"))?;
                self.all_reduce_in_place(buf.data_ptr(), count, sys::ncclDataType_t::ncclBfloat16)?;
                flat.f_copy_(&buf)
                    .map_err(device_error("widening to fp32"))?;
                Ok(())
            }
        }
    }

    fn broadcast(&mut self, flat: &mut Tensor, root: u32) -> Result<(), CollectiveError> {
        if flat.device() == Device::Cpu {
            return self.ring.broadcast(flat, root);
        }
        self.check_device_flat(flat)?;
        if root >= self.world_size() {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} outside a group of {}",
                self.world_size()
            )));
        }
        let count = flat.numel();
        if count == 0 {
            return Ok(());
        }
        let ptr = flat.data_ptr();
        // State transfers must arrive bit-exact: always fp32, whatever the wire type.
        self.run("ncclBroadcast", |comm| {
            // SAFETY: as in `all_reduce_sum`.
            #[allow(unsafe_code)]
            unsafe {
                nccl::broadcast(
                    ptr,
                    ptr,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    root as i32,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    fn broadcast_bytes(
        &mut self,
        bytes: &mut Vec<u8>,
        root: u32,
        max_len: usize,
    ) -> Result<(), CollectiveError> {
        self.ring.broadcast_bytes(bytes, root, max_len)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.ring.barrier()
    }

    fn abort_handle(&self) -> AbortHandle {
        self.ring.abort_handle()
    }
}

impl NcclBackend {
    /// Sums `count` elements of `dtype` at device address `ptr` over the group, in place.
    fn all_reduce_in_place(
        &mut self,
        ptr: *mut std::ffi::c_void,
        count: usize,
        dtype: sys::ncclDataType_t,
    ) -> Result<(), CollectiveError> {
        self.run("ncclAllReduce", |comm| {
            // SAFETY: callers pass the device memory of a live contiguous tensor of `count`
            // elements of `dtype` on the communicator's device, alive for the call and the
            // wait that follows; in place is allowed by NCCL.
            #[allow(unsafe_code)]
            unsafe {
                nccl::all_reduce(
                    ptr,
                    ptr,
                    count,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    std::ptr::null_mut(),
                )
            }
        })
    }

    /// A bf16 view of `count` elements of the wire buffer, grown when needed.
    fn wire_buffer(&mut self, count: usize) -> Result<Tensor, CollectiveError> {
        if self.wire_buf.as_ref().is_none_or(|b| b.numel() < count) {
            self.wire_buf = None;
            self.wire_buf = Some(
                Tensor::f_empty(
                    [count as i64],
                    (Kind::BFloat16, Device::Cuda(self.opts.device as usize)),
                )
                .map_err(device_error("allocating the bf16 wire buffer"))?,
            );
        }
        self.wire_buf
            .as_ref()
            .expect("allocated above")
            .f_narrow(0, 0, count as i64)
            .map_err(device_error("bf16 wire buffer view"))
    }
}

/// Initialises this rank's communicator on a helper thread, giving up after `opts.timeout`: a
/// blocking `ncclCommInitRank` waits for every rank, and one that died after the rendezvous
/// would hold it forever. A late success on the abandoned thread is aborted there.
fn init_comm(
    id: [u8; rendezvous::ID_BYTES],
    rank: u32,
    world: u32,
    opts: NcclOptions,
) -> Result<RawComm, CollectiveError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let device = opts.device;
    std::thread::Builder::new()
        .name("nccl-init".into())
        .spawn(move || {
            let result = cudart::device::set(device)
                .map_err(|e| cuda_error("cudaSetDevice", &e))
                .and_then(|()| {
                    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                    let unique = sys::ncclUniqueId {
                        internal: id.map(|b| b as std::ffi::c_char),
                    };
                    // SAFETY: a valid out pointer, the id from rank 0 and a rank within the
                    // world size; the device was set on this thread just above.
                    #[allow(unsafe_code)]
                    let r = unsafe {
                        nccl::comm_init_rank(&mut comm, world as i32, unique, rank as i32)
                    };
                    r.map(|_| RawComm(comm))
                        .map_err(|e| nccl_error("ncclCommInitRank", e.0))
                });
            if let Err(std::sync::mpsc::SendError(Ok(late))) = tx.send(result) {
                Slot {
                    comm: Mutex::new(Some(late)),
                }
                .abort();
            }
        })
        .map_err(|source| CollectiveError::Local { source })?;
    match rx.recv_timeout(opts.timeout) {
        Ok(result) => result,
        Err(_) => Err(CollectiveError::DeviceTimeout {
            op: "ncclCommInitRank",
            after: opts.timeout,
        }),
    }
}

/// Aborts the communicator when an armed wait outlives its deadline; one thread per
/// communicator, idle between operations.
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    /// The armed wait: its number and deadline.
    armed: Option<(u64, Instant)>,
    /// Waits armed so far.
    next: u64,
    /// The last wait the watchdog aborted.
    fired: Option<u64>,
    stop: bool,
}

impl Watchdog {
    fn start(slot: Weak<Slot>) -> Watchdog {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*theirs;
                let mut st = super::lock_ignoring_poison(lock);
                loop {
                    if st.stop {
                        return;
                    }
                    match st.armed {
                        None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                        Some((seq, deadline)) => {
                            let now = Instant::now();
                            if now < deadline {
                                st = cv
                                    .wait_timeout(st, deadline - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                                continue;
                            }
                            st.fired = Some(seq);
                            st.armed = None;
                            drop(st);
                            tracing::error!("NCCL operation timed out: aborting the communicator");
                            if let Some(s) = slot.upgrade() {
                                s.abort();
                            }
                            st = super::lock_ignoring_poison(lock);
                        }
                    }
                }
            })
            .ok();
        Watchdog { shared, thread }
    }

    /// Arms the watchdog for one wait; returns the wait's number.
    fn arm(&self, timeout: Duration) -> u64 {
        let (lock, cv) = &*self.shared;
        let mut st = super::lock_ignoring_poison(lock);
        let seq = st.next;
        st.next += 1;
        st.armed = Some((seq, Instant::now() + timeout));
        cv.notify_all();
        seq
    }

    /// Disarms wait `seq`; returns whether the watchdog fired on it.
    fn disarm(&self, seq: u64) -> bool {
        let (lock, cv) = &*self.shared;
        let mut st = super::lock_ignoring_poison(lock);
        if st.armed.is_some_and(|(s, _)| s == seq) {
            st.armed = None;
        }
        cv.notify_all();
        st.fired == Some(seq)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            super::lock_ignoring_poison(lock).stop = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Maps an NCCL result code to the collective error it means for the group. Failures that a
/// new communicator may cure (a peer's, the network's, CUDA's, NCCL's own timeout) are
/// retryable; misuse (bad arguments, wrong call order) would recur and is not.
pub fn nccl_error(op: &'static str, code: sys::ncclResult_t) -> CollectiveError {
    use sys::ncclResult_t as R;
    let meaning = match code {
        R::ncclSuccess | R::ncclInProgress => "no error",
        R::ncclUnhandledCudaError => "a CUDA call failed",
        R::ncclSystemError => "a system call failed (network, shared memory, ...)",
        R::ncclInternalError => "NCCL internal error",
        R::ncclInvalidArgument => "invalid argument",
        R::ncclInvalidUsage => "invalid usage",
        R::ncclRemoteError => "a remote rank failed or disconnected",
        _ => "unknown NCCL result",
    };
    let text = format!("{op}: {meaning} ({code:?})");
    match code {
        R::ncclInvalidArgument | R::ncclInvalidUsage => CollectiveError::InvalidArgument(text),
        _ => CollectiveError::Poisoned { cause: text },
    }
}

fn cuda_error(what: &str, e: &cudart::RuntimeError) -> CollectiveError {
    CollectiveError::Device(format!("{what}: {:?}", e.0))
}

fn device_error(what: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
    move |e| CollectiveError::Device(format!("{what}: {}", crate::model::torch_message(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::ncclResult_t as R;

    #[test]
    fn nccl_failures_of_the_group_are_retryable_and_misuse_is_not() {
        for code in [
            R::ncclUnhandledCudaError,
            R::ncclSystemError,
            R::ncclInternalError,
            R::ncclRemoteError,
        ] {
            let e = nccl_error("ncclAllReduce", code);
            assert!(e.retryable(), "{e}");
        }
        for code in [R::ncclInvalidArgument, R::ncclInvalidUsage] {
            assert!(!nccl_error("ncclAllReduce", code).retryable());
        }
        assert_eq!(
            nccl_error("ncclAllReduce", R::ncclRemoteError).to_string(),
            "communicator unusable after an earlier failure: ncclAllReduce: a remote rank \
             failed or disconnected (ncclRemoteError)"
        );
    }

    #[test]
    fn the_watchdog_fires_only_on_a_wait_that_outlives_its_deadline() {
        let slot = Arc::new(Slot {
            comm: Mutex::new(None),
        });
        let dog = Watchdog::start(Arc::downgrade(&slot));
        let quick = dog.arm(Duration::from_secs(60));
        assert!(!dog.disarm(quick));
        let slow = dog.arm(Duration::from_millis(20));
        // Waits for the watchdog thread however slowly it is scheduled: the test is about
        // which wait it fires on, not how fast.
        let give_up = Instant::now() + Duration::from_secs(30);
        while dog.shared.0.lock().unwrap().fired.is_none() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(dog.disarm(slow));
        // A later wait starts clean.
        let next = dog.arm(Duration::from_secs(60));
        assert!(!dog.disarm(next));
    }
}
