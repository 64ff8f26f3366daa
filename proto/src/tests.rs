//! Conversions between wire and domain: every message survives the round
//! trip, and every bound on inbound data is refused with its own message.

use crate::*;
use ringmaster_common::ids::{Generation, JobId, Rank, WorkerId};
use ringmaster_common::records::{JobState, JobStatusRecord};
use ringmaster_common::worker::{Device, WorkerState};
use std::path::PathBuf;
use std::time::Duration;

fn run() -> RunId {
    RunId {
        job: JobId("digits-mlp-3".into()),
        generation: Generation(7),
    }
}

fn spec() -> JobSpec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-mlp.toml");
    JobSpec::from_toml(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn metrics_of(pairs: &[(&str, f64)]) -> Metrics {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn registration() -> Registration {
    Registration {
        name: "gpu0".into(),
        host: "node-1".into(),
        device: Device::Cuda(Some(1)),
        data_addr: "10.0.0.2:7000".into(),
        threads: 8,
        current: Some(CurrentRun {
            run: run(),
            rank: Rank(1),
            step: 310,
            parked: true,
        }),
        instance: Some("00ff00ff00ff00ff".into()),
    }
}

fn start() -> StartTraining {
    StartTraining {
        run: run(),
        rank: Rank(1),
        peers: vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()],
        spec: spec(),
        progress_every_steps: 10,
        resume_candidates: vec![PathBuf::from("/ckpt/step-300"), "/ckpt/step-200".into()],
        state_source: None,
        cursor: None,
    }
}

fn reports() -> Vec<WorkerReport> {
    let ended = |outcome| {
        WorkerReport::Ended(TrainingEnded {
            run: run(),
            step: 1000,
            metrics: metrics_of(&[("loss", 0.25), ("val_accuracy", 0.96)]),
            outcome,
        })
    };
    vec![
        WorkerReport::Register(registration()),
        WorkerReport::Register(Registration {
            device: Device::Cpu,
            current: None,
            instance: None,
            ..registration()
        }),
        WorkerReport::Heartbeat,
        WorkerReport::Progress(Progress {
            run: run(),
            step: 40,
            epoch: 1,
            total_steps: 1000,
            metrics: metrics_of(&[("loss", 1.5), ("samples_per_sec", 1e5)]),
        }),
        WorkerReport::Checkpoint(CheckpointReport {
            run: run(),
            step: 300,
            metrics: metrics_of(&[("val_loss", 0.5)]),
            outcome: Ok(WrittenCheckpoint {
                dir: "/ckpt/digits-mlp-3/step-300".into(),
                bytes: 123_456,
                write_seconds: 0.25,
                blocked_seconds: 0.01,
            }),
        }),
        WorkerReport::Checkpoint(CheckpointReport {
            run: run(),
            step: 300,
            metrics: Metrics::new(),
            outcome: Err("disk full".into()),
        }),
        WorkerReport::Note(Note {
            run: run(),
            text: "checkpoint step-200 is corrupt; resuming from step-100".into(),
        }),
        WorkerReport::Parked(Parked {
            run: run(),
            step: 417,
            lost_peer: Some(Rank(2)),
            reason: "collective: lost peer rank 2".into(),
        }),
        WorkerReport::Parked(Parked {
            run: run(),
            step: 0,
            lost_peer: None,
            reason: String::new(),
        }),
        WorkerReport::Rebound(Rebound {
            run: run(),
            step: 417,
            transfer: Some((1 << 20, 0.031)),
        }),
        WorkerReport::Rebound(Rebound {
            run: run(),
            step: 0,
            transfer: None,
        }),
        ended(RunOutcome::Succeeded { stopped: false }),
        ended(RunOutcome::Succeeded { stopped: true }),
        ended(RunOutcome::Failed {
            reason: "out of memory".into(),
            cause: FailureCause::OwnWork,
        }),
        ended(RunOutcome::Failed {
            reason: "collective: peer rank 0 lost".into(),
            cause: FailureCause::DataPlane {
                lost_peer: Some(Rank(0)),
            },
        }),
        ended(RunOutcome::Failed {
            reason: "collective: shape mismatch".into(),
            cause: FailureCause::DataPlane { lost_peer: None },
        }),
    ]
}

fn commands() -> Vec<Command> {
    vec![
        Command::Prepare(Box::new(PrepareJob {
            job: JobId("digits-mlp-3".into()),
            spec: spec(),
        })),
        Command::Registered(Registered {
            worker: WorkerId("w12".into()),
            heartbeat_interval: Duration::from_millis(1000),
        }),
        Command::Start(Box::new(start())),
        Command::Start(Box::new(StartTraining {
            rank: Rank(0),
            peers: vec!["127.0.0.1:9".into()],
            resume_candidates: Vec::new(),
            ..start()
        })),
        Command::Start(Box::new(StartTraining {
            resume_candidates: Vec::new(),
            state_source: Some(Rank(0)),
            cursor: Some(4242),
            ..start()
        })),
        Command::Checkpoint(CheckpointRequest {
            run: run(),
            stop: true,
        }),
        Command::Abort(AbortTraining {
            run: run(),
            reason: "worker n2 (rank 2) lost: session closed".into(),
            keep_state: false,
        }),
        Command::Abort(AbortTraining {
            run: run(),
            reason: "rank 2 lost; re-forming".into(),
            keep_state: true,
        }),
    ]
}

#[test]
fn every_worker_report_survives_the_wire() {
    for report in reports() {
        let wire = pb::WorkerMessage::from(report.clone());
        assert_eq!(WorkerReport::try_from(wire), Ok(report));
    }
}

#[test]
fn every_command_survives_the_wire() {
    for command in commands() {
        let wire = pb::CoordinatorMessage::from(command.clone());
        assert_eq!(Command::try_from(wire), Ok(command));
    }
}

#[test]
fn the_wire_form_of_reports_and_commands_is_what_older_peers_read() {
    let pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Register(r)),
    } = WorkerReport::Register(registration()).into()
    else {
        panic!("not a registration");
    };
    assert_eq!(
        (r.device.as_str(), r.protocol_version, r.instance.as_str()),
        ("cuda:1", PROTOCOL_VERSION, "00ff00ff00ff00ff")
    );
    let ended = pb::TrainingEnded::from(TrainingEnded {
        run: run(),
        step: 0,
        metrics: Metrics::new(),
        outcome: RunOutcome::Failed {
            reason: "peer lost".into(),
            cause: FailureCause::DataPlane {
                lost_peer: Some(Rank(2)),
            },
        },
    });
    assert_eq!(
        (ended.success, ended.peer_fault, ended.lost_peer_rank),
        (false, true, Some(2))
    );
    // A lost peer without `peer_fault` (an older sender) is still a
    // data-plane failure.
    let older = pb::TrainingEnded {
        peer_fault: false,
        ..ended
    };
    assert_eq!(
        TrainingEnded::try_from(older).map(|e| e.outcome),
        Ok(RunOutcome::Failed {
            reason: "peer lost".into(),
            cause: FailureCause::DataPlane {
                lost_peer: Some(Rank(2)),
            },
        })
    );
    let start = pb::StartTraining::from(start());
    assert_eq!(spec_from_json(&start.spec_json), Ok(spec()));
    assert_eq!(
        start.resume_candidates,
        ["/ckpt/step-300", "/ckpt/step-200"]
    );
}

/// An inbound worker message must be refused with exactly `expected`.
#[track_caller]
fn refused(kind: pb::worker_message::Kind, expected: &str) {
    let got = WorkerReport::try_from(pb::WorkerMessage { kind: Some(kind) });
    match got {
        Err(e) => assert_eq!(e.to_string(), expected),
        Ok(r) => panic!("accepted {r:?}, expected: {expected}"),
    }
}

/// An inbound command must be refused with exactly `expected`.
#[track_caller]
fn refused_command(kind: pb::coordinator_message::Kind, expected: &str) {
    let got = Command::try_from(pb::CoordinatorMessage { kind: Some(kind) });
    match got {
        Err(e) => assert_eq!(e.to_string(), expected),
        Ok(c) => panic!("accepted {c:?}, expected: {expected}"),
    }
}

fn wire_register() -> pb::Register {
    match pb::WorkerMessage::from(WorkerReport::Register(registration())).kind {
        Some(pb::worker_message::Kind::Register(r)) => r,
        _ => unreachable!(),
    }
}

fn wire_start() -> pb::StartTraining {
    pb::StartTraining::from(start())
}

fn wire_ended() -> pb::TrainingEnded {
    pb::TrainingEnded {
        job_id: "digits-mlp-3".into(),
        generation: 7,
        ..Default::default()
    }
}

fn wire_metrics(n: usize, name_len: usize) -> std::collections::HashMap<String, f64> {
    (0..n)
        .map(|i| (format!("{i:0>name_len$}"), i as f64))
        .collect()
}

#[test]
fn registrations_out_of_bounds_are_refused() {
    use pb::worker_message::Kind::Register;
    let long = "x".repeat(MAX_LABEL_BYTES + 1);
    refused(
        Register(pb::Register {
            protocol_version: 2,
            name: long.clone(),
            ..wire_register()
        }),
        "worker speaks protocol 2, this coordinator speaks 1",
    );
    for (field, set) in [
        (
            "register.name",
            (|r: &mut pb::Register, s| r.name = s) as fn(&mut _, _),
        ),
        ("register.host", |r, s| r.host = s),
        ("register.device", |r, s| r.device = s),
        ("register.data_addr", |r, s| r.data_addr = s),
        ("register.instance", |r, s| r.instance = s),
    ] {
        let mut r = wire_register();
        set(&mut r, long.clone());
        refused(
            Register(r),
            &format!("{field} is 257 bytes, more than the 256 allowed"),
        );
    }
    // At the bound is fine.
    let at_bound = pb::Register {
        name: "x".repeat(MAX_LABEL_BYTES),
        ..wire_register()
    };
    assert!(Registration::try_from(at_bound).is_ok());
    refused(
        Register(pb::Register {
            device: "gpu".into(),
            ..wire_register()
        }),
        "unknown device `gpu`, expected `cpu` or `cuda:N`",
    );
    refused(
        Register(pb::Register {
            current: Some(pb::CurrentRun {
                job_id: "Bad/Id".into(),
                ..Default::default()
            }),
            ..wire_register()
        }),
        "job id \"Bad/Id\" contains 'B'; only a-z, 0-9 and '-' are allowed",
    );
}

#[test]
fn reports_out_of_bounds_are_refused() {
    use pb::worker_message::Kind;
    let too_long_text = "x".repeat(MAX_TEXT_BYTES + 1);
    refused(
        Kind::Note(pb::Note {
            job_id: "digits-mlp-3".into(),
            text: too_long_text.clone(),
            ..Default::default()
        }),
        "note.text is 65537 bytes, more than the 65536 allowed",
    );
    refused(
        Kind::Ended(pb::TrainingEnded {
            reason: too_long_text.clone(),
            ..wire_ended()
        }),
        "ended.reason is 65537 bytes, more than the 65536 allowed",
    );
    refused(
        Kind::Checkpoint(pb::CheckpointReport {
            job_id: "digits-mlp-3".into(),
            ok: false,
            error: too_long_text,
            ..Default::default()
        }),
        "checkpoint.error is 65537 bytes, more than the 65536 allowed",
    );
    refused(
        Kind::Checkpoint(pb::CheckpointReport {
            job_id: "digits-mlp-3".into(),
            ok: true,
            dir: "/".repeat(MAX_PATH_BYTES + 1),
            ..Default::default()
        }),
        "checkpoint.dir is 4097 bytes, more than the 4096 allowed",
    );
    refused(
        Kind::Progress(pb::Progress {
            job_id: "digits-mlp-3".into(),
            metrics: wire_metrics(MAX_METRICS + 1, 4),
            ..Default::default()
        }),
        "progress.metrics has 257 entries, more than the 256 allowed",
    );
    refused(
        Kind::Ended(pb::TrainingEnded {
            success: true,
            metrics: wire_metrics(1, MAX_METRIC_NAME_BYTES + 1),
            ..wire_ended()
        }),
        "a metric name in ended.metrics is 129 bytes, more than the 128 allowed",
    );
    refused(
        Kind::Checkpoint(pb::CheckpointReport {
            job_id: "digits-mlp-3".into(),
            ok: true,
            metrics: wire_metrics(MAX_METRICS + 1, 4),
            ..Default::default()
        }),
        "checkpoint.metrics has 257 entries, more than the 256 allowed",
    );
    // At the bounds is fine.
    let at_bound = pb::Progress {
        job_id: "digits-mlp-3".into(),
        metrics: wire_metrics(MAX_METRICS, MAX_METRIC_NAME_BYTES),
        ..Default::default()
    };
    assert!(
        WorkerReport::try_from(pb::WorkerMessage {
            kind: Some(Kind::Progress(at_bound))
        })
        .is_ok()
    );
    refused(
        Kind::Progress(pb::Progress {
            job_id: String::new(),
            ..Default::default()
        }),
        "job id is empty",
    );
    let empty = WorkerReport::try_from(pb::WorkerMessage { kind: None });
    assert_eq!(
        empty.map_err(|e| e.to_string()),
        Err("worker message has no kind".into())
    );
}

#[test]
fn commands_out_of_bounds_are_refused() {
    use pb::coordinator_message::Kind;
    refused_command(
        Kind::Start(pb::StartTraining {
            peers: vec!["127.0.0.1:9".into(); MAX_PEERS + 1],
            ..wire_start()
        }),
        "start.peers has 1025 entries, more than the 1024 allowed",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            peers: vec!["x".repeat(MAX_LABEL_BYTES + 1)],
            rank: 0,
            ..wire_start()
        }),
        "start.peers is 257 bytes, more than the 256 allowed",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            rank: 2,
            ..wire_start()
        }),
        "rank 2 is outside a group of 2",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            state_source_rank: Some(3),
            ..wire_start()
        }),
        "rank 3 is outside a group of 2",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            resume_candidates: vec![String::new(); MAX_RESUME_CANDIDATES + 1],
            ..wire_start()
        }),
        "start.resume_candidates has 65537 entries, more than the 65536 allowed",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            resume_candidates: vec!["/".repeat(MAX_PATH_BYTES + 1)],
            ..wire_start()
        }),
        "start.resume_candidates is 4097 bytes, more than the 4096 allowed",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            spec_json: " ".repeat(MAX_SPEC_BYTES + 1),
            ..wire_start()
        }),
        "job spec is 1048577 bytes, more than the 1048576 allowed",
    );
    refused_command(
        Kind::Start(pb::StartTraining {
            spec_json: "{}".into(),
            ..wire_start()
        }),
        "job spec is not valid JSON for this version: missing field `name` at line 1 column 2",
    );
    let mut invalid = spec();
    invalid.workers.min = 0;
    refused_command(
        Kind::Start(pb::StartTraining {
            spec_json: spec_to_json(&invalid),
            ..wire_start()
        }),
        "job spec is invalid: workers.min must be between 1 and 1024, got 0",
    );
    refused_command(
        Kind::Abort(pb::AbortTraining {
            job_id: "digits-mlp-3".into(),
            generation: 7,
            reason: "x".repeat(MAX_TEXT_BYTES + 1),
            keep_state: false,
        }),
        "abort.reason is 65537 bytes, more than the 65536 allowed",
    );
    refused_command(
        Kind::Registered(pb::Registered {
            worker_id: "W 1".into(),
            heartbeat_interval_ms: 1000,
        }),
        "worker id \"W 1\" contains 'W'; only a-z, 0-9 and '-' are allowed",
    );
    refused_command(
        Kind::Checkpoint(pb::CheckpointRequest {
            job_id: "j".repeat(81),
            generation: 1,
            stop: false,
        }),
        "job id is 81 bytes long, the limit is 80",
    );
    let empty = Command::try_from(pb::CoordinatorMessage { kind: None });
    assert_eq!(
        empty.map_err(|e| e.to_string()),
        Err("coordinator message has no kind".into())
    );
}

#[test]
fn a_start_that_cannot_be_used_still_names_its_run() {
    let bad = pb::CoordinatorMessage {
        kind: Some(pb::coordinator_message::Kind::Start(pb::StartTraining {
            spec_json: "{}".into(),
            ..wire_start()
        })),
    };
    assert!(Command::try_from(bad.clone()).is_err());
    assert_eq!(bad.start_of(), Some((run(), Rank(1))));
    let abort = pb::CoordinatorMessage::from(Command::Abort(AbortTraining {
        run: run(),
        reason: String::new(),
        keep_state: false,
    }));
    assert_eq!(abort.start_of(), None);
}

#[test]
fn every_job_state_survives_the_wire_and_unknown_ones_are_refused() {
    for state in JobState::ALL {
        let status = pb::JobStatus {
            state: pb::JobState::from(state) as i32,
            ..Default::default()
        };
        assert_eq!(status.job_state(), Ok(state));
    }
    for bad in [0, 7, -1] {
        let status = pb::JobStatus {
            state: bad,
            ..Default::default()
        };
        assert_eq!(status.job_state(), Err(WireError::UnknownJobState(bad)));
    }
}

#[test]
fn worker_views_carry_their_state_and_unknown_states_are_refused() {
    let idle = WorkerView {
        id: WorkerId("w1".into()),
        name: "n0".into(),
        host: "h".into(),
        device: Device::Cuda(None),
        assignment: None,
        last_heartbeat_ms_ago: 5,
        data_addr: "127.0.0.1:9".into(),
        cordon: None,
    };
    let busy = WorkerView {
        assignment: Some((JobId("j-1".into()), Rank(3))),
        ..idle.clone()
    };
    let wire = pb::WorkerInfo::from(idle);
    assert_eq!(
        (
            wire.worker_state(),
            wire.device.as_str(),
            wire.job_id.as_str()
        ),
        (Ok(WorkerState::Idle), "cuda", "")
    );
    let wire = pb::WorkerInfo::from(busy);
    assert_eq!(
        (wire.worker_state(), wire.job_id.as_str(), wire.rank),
        (Ok(WorkerState::Busy), "j-1", 3)
    );
    for bad in [0, 3, -1] {
        let info = pb::WorkerInfo {
            state: bad,
            ..Default::default()
        };
        assert_eq!(
            info.worker_state().map_err(|e| e.to_string()),
            Err(format!("unknown worker state {bad} on the wire"))
        );
    }
}

#[test]
fn a_cordon_travels_with_its_reason_and_remaining_time() {
    use ringmaster_common::records::CordonKind;
    let view = WorkerView {
        id: WorkerId("w1".into()),
        name: "n0".into(),
        host: "h".into(),
        device: Device::Cpu,
        assignment: None,
        last_heartbeat_ms_ago: 5,
        data_addr: "127.0.0.1:9".into(),
        cordon: Some(crate::CordonView {
            kind: CordonKind::Quarantined,
            reason: "3 incidents in 10 min".into(),
            remaining_secs: Some(42),
        }),
    };
    let wire = pb::WorkerInfo::from(view.clone());
    assert_eq!(wire.cordon_view(), Ok(view.cordon.clone()));
    let open = pb::WorkerInfo::from(WorkerView {
        cordon: None,
        ..view
    });
    assert_eq!(open.cordon_view(), Ok(None));
    let bad = pb::WorkerInfo {
        cordon: 9,
        ..Default::default()
    };
    assert_eq!(
        bad.cordon_view().map_err(|e| e.to_string()),
        Err("unknown cordon kind 9 on the wire".to_string())
    );
}

#[test]
fn a_job_view_shows_why_it_waits_only_while_queued() {
    let record = ringmaster_common::records::JobRecord {
        id: JobId("digits-mlp-1".into()),
        spec: spec(),
        submitted_at_ms: 11,
        resume_from: None,
    };
    let mut status = JobStatusRecord {
        state: JobState::Queued,
        generation: 0,
        step: 0,
        total_steps: 0,
        metrics: metrics_of(&[("loss", f64::NAN)]),
        members: Vec::new(),
        reason: None,
        output_dir: "/out/digits-mlp-1".into(),
        updated_at_ms: 12,
        events: vec!["queued".into()],
        restarts: 2,
        incidents: Vec::new(),
    };
    let waiting = Some("waiting for workers".to_string());
    let wire = pb::JobStatus::from(JobView::new(&record, &status, waiting.clone()));
    assert_eq!(
        (
            wire.job_state(),
            wire.waiting.as_str(),
            wire.name.as_str(),
            wire.submitted_at_ms
        ),
        (
            Ok(JobState::Queued),
            "waiting for workers",
            "digits-mlp",
            11
        )
    );
    assert!(wire.metrics["loss"].is_nan());
    status.state = JobState::Failed;
    status.reason = Some("worker n1 lost".into());
    let wire = pb::JobStatus::from(JobView::new(&record, &status, waiting));
    assert_eq!(
        (wire.waiting.as_str(), wire.reason.as_str()),
        ("", "worker n1 lost")
    );
}

#[test]
fn health_views_say_who_leads() {
    let leader = pb::HealthResponse::from(HealthView {
        role: Role::Leader {
            store: "embedded:///s".into(),
            jobs: 3,
            running_jobs: 1,
            workers: 2,
        },
        degraded: None,
        version: "1.0".into(),
    });
    assert_eq!(
        (leader.role.as_str(), leader.store.as_str(), leader.jobs),
        ("leader", "embedded:///s", 3)
    );
    let standby = pb::HealthResponse::from(HealthView {
        role: Role::Standby {
            leader: Some("http://10.0.0.1:50051".into()),
        },
        degraded: Some("store unreachable".into()),
        version: "1.0".into(),
    });
    assert_eq!(
        (
            standby.role.as_str(),
            standby.leader.as_str(),
            standby.degraded.as_str(),
            standby.workers
        ),
        ("standby", "http://10.0.0.1:50051", "store unreachable", 0)
    );
    assert!(standby.is_standby() && !leader.is_standby());
}

#[test]
fn a_rebound_with_half_a_transfer_or_a_negative_time_is_refused() {
    for (bytes, seconds) in [(Some(1), None), (None, Some(0.5)), (Some(1), Some(-1.0))] {
        let wire = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Rebound(pb::Rebound {
                job_id: "digits-mlp-3".into(),
                generation: 2,
                step: 5,
                transfer_bytes: bytes,
                transfer_seconds: seconds,
            })),
        };
        assert_eq!(
            WorkerReport::try_from(wire).map_err(|e| e.to_string()),
            Err("rebound.transfer is malformed".to_string())
        );
    }
}
