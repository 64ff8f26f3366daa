//! gRPC services: `Control` (CLI and admins) and `Agent` (worker sessions).
//! Handlers translate requests into control-loop messages and back; they hold
//! no state. This is the wire boundary: inbound messages become domain types
//! here (`TryFrom`, refusing what is malformed) and the control loop's views
//! and commands become wire messages here (`From`). Domain errors map to gRPC
//! codes in [`to_status`] and nowhere else.

use crate::control::{self, ControlError, ControlHandle, CordonAction, Msg, Reply};
use ringmaster_common::jobspec::JobSpec;
use ringmaster_common::now_ms;
use ringmaster_proto::pb::{
    self, CoordinatorMessage, WorkerMessage, agent_server::Agent, control_server::Control,
    worker_message,
};
use ringmaster_proto::{HealthView, Registration, Role as HealthRole, WireError, WorkerReport};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

/// The one place where domain errors become gRPC status codes.
pub fn to_status(e: ControlError) -> Status {
    let msg = e.to_string();
    match e {
        ControlError::JobNotFound(_) | ControlError::WorkerNotFound(_) => Status::not_found(msg),
        ControlError::JobFinished { .. } | ControlError::WrongState { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::Invalid(_) | ControlError::Id(_) => Status::invalid_argument(msg),
        ControlError::Wire(WireError::ProtocolVersion(_)) => Status::failed_precondition(msg),
        ControlError::Wire(_) => Status::invalid_argument(msg),
        ControlError::Store(ref s) if s.retryable() => Status::unavailable(msg),
        ControlError::Store(_) => Status::internal(msg),
        ControlError::ShuttingDown => Status::unavailable(msg),
        ControlError::DuplicateName { .. } => Status::already_exists(msg),
    }
}

/// What this coordinator is: the leader (with its control loop) or a
/// standby that knows where the leader is.
#[derive(Clone)]
pub enum Role {
    Standby {
        leader: Option<String>,
        /// Why this coordinator cannot lead or find a leader, e.g. the
        /// store does not answer (it stepped down for that reason).
        problem: Option<String>,
    },
    Leader(ControlHandle),
}

/// Both services share the role; handlers reach the control loop through it.
#[derive(Clone)]
pub struct Services {
    pub role: Arc<std::sync::RwLock<Role>>,
}

/// The message prefix a standby answers with; clients look for it to find
/// the leader.
pub const STANDBY_PREFIX: &str = "this coordinator is a standby; the leader is at ";

impl Services {
    /// The control loop, or an `unavailable` status naming the leader.
    fn control(&self) -> Result<ControlHandle, Status> {
        match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Leader(h) => Ok(h.clone()),
            Role::Standby {
                leader: Some(url), ..
            } => Err(Status::unavailable(format!("{STANDBY_PREFIX}{url}"))),
            Role::Standby {
                leader: None,
                problem: Some(p),
            } => Err(Status::unavailable(format!(
                "this coordinator is a standby and no leader is known: {p}"
            ))),
            Role::Standby {
                leader: None,
                problem: None,
            } => Err(Status::unavailable(
                "this coordinator is a standby and no leader is elected yet",
            )),
        }
    }
}

impl Services {
    /// Sends one request to the control loop; errors become statuses.
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, Status> {
        self.control()?.call(make).await.map_err(to_status)
    }

    async fn cordon(
        &self,
        req: Request<pb::WorkerRequest>,
        action: CordonAction,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let pb::WorkerRequest { worker, reason } = req.into_inner();
        if worker.trim().is_empty() {
            return Err(Status::invalid_argument("no worker given"));
        }
        let view = self.ask(|r| Msg::Cordon(worker, action, reason, r)).await?;
        Ok(Response::new(view.into()))
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Control for Services {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let spec = JobSpec::try_from(req.get_ref()).map_err(|e| to_status(e.into()))?;
        let resume_from = match req.get_ref().resume_from.as_str() {
            "" => None,
            p if std::path::Path::new(p).is_absolute() => Some(std::path::PathBuf::from(p)),
            p => {
                return Err(Status::invalid_argument(format!(
                    "resume_from must be an absolute path, got `{p}`"
                )));
            }
        };
        let id = self.ask(|r| Msg::Submit(spec, resume_from, r)).await?;
        Ok(Response::new(pb::SubmitResponse::from(&id)))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let s = self.ask(|r| Msg::GetJob(id, r)).await?;
        Ok(Response::new(s.into()))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.ask(Msg::ListJobs).await?;
        Ok(Response::new(pb::ListJobsResponse::from(jobs)))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let req = req.into_inner();
        let s = self.ask(|r| Msg::Cancel(req.job_id, req.now, r)).await?;
        Ok(Response::new(s.into()))
    }

    async fn resume_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let s = self.ask(|r| Msg::Resume(id, r)).await?;
        Ok(Response::new(s.into()))
    }

    async fn request_checkpoint(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let s = self.ask(|r| Msg::RequestCheckpoint(id, r)).await?;
        Ok(Response::new(s.into()))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        // A standby answers this one call itself, so an admin can see each
        // coordinator's role and trouble; clients looking for the leader
        // read `role`.
        let standby = match &*self.role.read().unwrap_or_else(|e| e.into_inner()) {
            Role::Leader(_) => None,
            Role::Standby { leader, problem } => Some((leader.clone(), problem.clone())),
        };
        if let Some((leader, problem)) = standby {
            return Ok(Response::new(
                HealthView {
                    role: HealthRole::Standby { leader },
                    degraded: problem,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                }
                .into(),
            ));
        }
        let h = self.ask(Msg::Health).await?;
        Ok(Response::new(h.into()))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let id = req.into_inner().job_id;
        let committed = self.ask(|r| Msg::ListCheckpoints(id, r)).await?;
        // The directory listing is file IO: never inside the control loop.
        let checkpoints = tokio::task::spawn_blocking(move || control::with_uncommitted(committed))
            .await
            .map_err(|e| Status::internal(format!("listing checkpoints: {e}")))?;
        Ok(Response::new(pb::ListCheckpointsResponse::from(
            checkpoints.as_slice(),
        )))
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.ask(Msg::ListWorkers).await?;
        Ok(Response::new(pb::ListWorkersResponse::from(workers)))
    }

    async fn drain_worker(
        &self,
        req: Request<pb::WorkerRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        self.cordon(req, CordonAction::Drain).await
    }

    async fn cordon_worker(
        &self,
        req: Request<pb::WorkerRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        self.cordon(req, CordonAction::Cordon).await
    }

    async fn uncordon_worker(
        &self,
        req: Request<pb::WorkerRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        self.cordon(req, CordonAction::Uncordon).await
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        let mut rx = self.ask(|r| Msg::Watch(id, r)).await?;
        let (tx, out) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let current = rx.borrow_and_update().clone();
                let done = current.status.state.is_final();
                if tx.send(Ok(current.into())).await.is_err() || done {
                    break;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Services {
    type SessionStream = CommandStream;

    async fn session(
        &self,
        req: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("session closed before registering"))?;
        let Some(worker_message::Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first session message must be a registration",
            ));
        };
        // A registration of another protocol version, or one out of
        // bounds, is refused before the session exists.
        let registration = Registration::try_from(register).map_err(|e| to_status(e.into()))?;
        let (tx, rx) = mpsc::channel(64);
        let last_seen = Arc::new(AtomicU64::new(now_ms()));
        // The control loop sends `Registered` first on this channel.
        let control = self.control()?;
        let worker = control
            .call(|r| Msg::Register(registration, tx, last_seen.clone(), r))
            .await
            .map_err(to_status)?;
        tokio::spawn(async move {
            let reason = loop {
                let next = inbound.next().await;
                if matches!(next, Some(Ok(_))) {
                    last_seen.store(now_ms(), Ordering::Relaxed);
                }
                match next {
                    Some(Ok(message)) => match WorkerReport::try_from(message) {
                        // Liveness is all a heartbeat carries: it stops here.
                        Ok(WorkerReport::Heartbeat) => {}
                        Ok(report) => control.from_session(Msg::FromWorker(worker.clone(), report)),
                        // One bad report does not end a session that
                        // otherwise works (and whose heartbeats count).
                        Err(e) => warn!(worker = %worker, "refusing a report: {e}"),
                    },
                    Some(Err(status)) => break format!("session broken: {}", status.message()),
                    None => break "session closed".to_string(),
                }
            };
            control.from_session(Msg::Disconnected(worker, reason));
        });
        let commands = ReceiverStream::new(rx).map(|c| Ok(CoordinatorMessage::from(c)));
        Ok(Response::new(Box::pin(commands)))
    }
}
