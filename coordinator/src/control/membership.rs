//! Membership: the workers the loop knows (`Worker`, its `Assignment`, the
//! `Release` of an ended job's member), registration and disconnect, the
//! worker records in the store and the membership lease that binds them.

use super::timers::TimerKind;
use super::{Cluster, ControlError, ControlHandle, Health, Msg, Reply, SessionTx};
use ringmaster_common::ids::{JobId, Rank, WorkerId};
use ringmaster_common::now_ms;
use ringmaster_common::records;
use ringmaster_common::records::JobState;
use ringmaster_proto::{Command, Registered, Registration, RunId, WorkerView};
use ringmaster_store::{LeaseId, StateStore, StoreError, keys};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub(super) struct Worker {
    /// As registered, less the run it reported (adopted at registration).
    pub(super) info: Registration,
    pub(super) tx: SessionTx,
    /// When the session last heard from the worker (ms since the epoch),
    /// updated by the session task itself: heartbeats never queue behind
    /// the control loop's work, so a slow store write cannot make live
    /// workers look dead.
    pub(super) last_seen: Arc<AtomicU64>,
    /// The run and rank it holds, while assigned.
    pub(super) assignment: Option<Assignment>,
    /// The running job it was last told to prepare for (`PrepareJob`).
    pub(super) prepared: Option<JobId>,
}

/// A worker's rank in one generation of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Assignment {
    pub(super) run: RunId,
    pub(super) rank: Rank,
}

/// A member of an ended job that has not reported its end yet: freed at
/// `at` if it still holds that assignment then.
pub(super) struct Release {
    pub(super) at: Instant,
    pub(super) worker: WorkerId,
    pub(super) run: RunId,
}

/// TTL of the membership lease.
pub(super) const LEASE_TTL: Duration = Duration::from_secs(10);

/// Keeps the membership lease alive; a failure marks the coordinator
/// degraded (jobs keep training: the coordinator is off the step path) and a
/// lost lease is replaced once the store answers again.
pub(super) async fn keep_lease(
    store: Arc<dyn StateStore>,
    mut lease: LeaseId,
    health: Health,
    control: ControlHandle,
) {
    let mut tick = tokio::time::interval(LEASE_TTL / 4);
    loop {
        tick.tick().await;
        match store.keep_alive(lease).await {
            Ok(_) => {
                if health.get().is_some() {
                    health.set(None);
                    // Registrations skipped while degraded are written now.
                    control.notify(Msg::NewLease(lease)).await;
                }
            }
            Err(StoreError::LeaseNotFound(_)) => match store.grant_lease(LEASE_TTL).await {
                Ok(new) => {
                    lease = new;
                    health.set(None);
                    control.notify(Msg::NewLease(new)).await;
                }
                Err(e) => health.set(Some(format!("cannot write the store: {e}"))),
            },
            Err(e) => health.set(Some(format!("cannot reach the store: {e}"))),
        }
        if control.tx.is_closed() {
            let _ = store.revoke_lease(lease).await;
            return;
        }
    }
}

impl Cluster {
    /// A worker's first message: a duplicate name is refused unless it is the
    /// same process reconnecting, `Registered` goes out before any other
    /// command, then the registration is recorded and the run it reports is
    /// adopted.
    pub(super) async fn register(
        &mut self,
        mut info: Registration,
        tx: SessionTx,
        last_seen: Arc<AtomicU64>,
        reply: Reply<WorkerId>,
    ) {
        if let Some((old, w)) = self.workers.iter().find(|(_, w)| w.info.name == info.name) {
            // A worker that sent no instance can never prove it is
            // the same process.
            if w.info.instance.is_none() || w.info.instance != info.instance {
                let _ = reply.send(Err(ControlError::DuplicateName {
                    name: info.name.clone(),
                    id: old.to_string(),
                    host: w.info.host.clone(),
                    data_addr: w.info.data_addr.clone(),
                }));
                return;
            }
            // The same process again: its old session broke without
            // the coordinator noticing yet. The new one replaces it,
            // and the run it reports is adopted below.
            let old = old.clone();
            info!(worker = %old, name = %info.name, "worker reconnected; replacing its old session");
            self.workers.remove(&old);
            if let Some(job) = self
                .jobs
                .values_mut()
                .find(|j| j.members.iter().any(|m| m.worker.as_ref() == Some(&old)))
            {
                for (rank, m) in job.members.iter_mut().enumerate() {
                    if m.worker.as_ref() == Some(&old) {
                        m.worker = None;
                        // Noted when it takes the rank back below.
                        job.broken
                            .insert(Rank(rank as u32), "its session broke".into());
                    }
                }
            }
        }
        let id = WorkerId(format!("w{}", self.next_worker));
        self.next_worker += 1;
        info!(worker = %id, name = %info.name, data = %info.data_addr, "worker joined");
        // Registered goes first on the session, before any command.
        let registered = Command::Registered(Registered {
            worker: id.clone(),
            heartbeat_interval: self.cfg.heartbeat_interval,
        });
        if tx.try_send(registered).is_err() {
            let _ = reply.send(Err(ControlError::ShuttingDown));
            return;
        }
        let current = info.current.take();
        self.workers.insert(
            id.clone(),
            Worker {
                info,
                tx,
                last_seen,
                assignment: None,
                prepared: None,
            },
        );
        let _ = reply.send(Ok(id.clone()));
        self.put_worker_record(&id).await;
        if let Some(run) = current {
            self.adopt(&id, run).await;
        }
        self.schedule().await;
        self.offer_running_job(&id);
    }

    /// A worker's session closed or went silent: its registration is removed
    /// and the job it held re-forms without it (or fails, naming it, when it
    /// may not restart). A broken session (`may_reconnect`) of a running
    /// job's member first leaves the rank open for `reconnect_grace`: the
    /// process may be alive and training, and take its rank back.
    pub(super) async fn disconnected(&mut self, id: WorkerId, reason: String, may_reconnect: bool) {
        if let Some(w) = self.workers.remove(&id) {
            info!(worker = %id, name = %w.info.name, "worker left: {reason}");
            if self.writable().is_ok()
                && let Ok(key) = keys::worker(&id)
                && let Err(e) = self.store.delete(&key).await
            {
                warn!(worker = %id, "could not remove the registration: {e}");
            }
            if let Some(Assignment { run, rank }) = w.assignment {
                let grace = self.cfg.reconnect_grace;
                let pending = may_reconnect
                    && !grace.is_zero()
                    && self.jobs.get_mut(&run.job).is_some_and(|job| {
                        let open = job.status.state == JobState::Running
                            && job.generation() == run.generation
                            && job.members.get(rank.index()).is_some();
                        if open {
                            job.members[rank.index()].worker = None;
                            job.broken.insert(rank, reason.clone());
                            job.set_timer(TimerKind::Reconnect, grace);
                        }
                        open
                    });
                if !pending {
                    self.member_lost(&run.job, run.generation, rank, reason)
                        .await;
                }
            }
            self.schedule().await;
        }
    }

    /// Records a registration in the store, bound to the coordinator's lease
    /// (membership changes are the only worker writes; heartbeats never are).
    pub(super) async fn put_worker_record(&mut self, id: &WorkerId) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if self.health.get().is_some() {
            // Written when the store is back (see `keep_lease`), rather than
            // stalling the control loop on a store that does not answer.
            return;
        }
        let record = records::WorkerRecord {
            id: id.clone(),
            name: w.info.name.clone(),
            host: w.info.host.clone(),
            device: w.info.device.to_string(),
            data_addr: w.info.data_addr.clone(),
            registered_at_ms: now_ms(),
        };
        let result = match keys::worker(id) {
            Ok(key) => match records::encode(&key, &record) {
                Ok(bytes) => self
                    .store
                    .put_with_lease(&key, bytes, self.lease)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.retryable() => self
                .health
                .set(Some(format!("cannot write the store: {e}"))),
            Err(e) => warn!(worker = %id, "could not record the registration: {e}"),
        }
    }

    pub(super) fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                name: w.info.name.clone(),
                host: w.info.host.clone(),
                device: w.info.device,
                assignment: w.assignment.as_ref().map(|a| (a.run.job.clone(), a.rank)),
                last_heartbeat_ms_ago: now_ms().saturating_sub(w.last_seen.load(Ordering::Relaxed)),
                data_addr: w.info.data_addr.clone(),
                cordon: self.cordon_view(&w.info.name, w.assignment.is_some()),
            })
            .collect()
    }
}
