//! Ringmaster's shared domain: ids, the validated job spec, the state store
//! (trait, key layout and backends), dataset manifests and the pure shard plan,
//! checkpoint files and retention, workers' devices and states, and telemetry
//! set-up. Nothing here knows about libtorch or Ringmaster's own protocol (the
//! etcd backend speaks etcd's gRPC through `etcd-client`).

pub mod checkpoint;
pub mod dataset;
pub mod ids;
pub mod jobspec;
pub mod store;
pub mod telemetry;
pub mod worker;

/// Milliseconds since the Unix epoch, for timestamps in store records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
