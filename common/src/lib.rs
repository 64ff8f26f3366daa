//! Ringmaster's shared domain: ids, the validated job spec, the state store
//! (trait, key layout and backends), dataset manifests and the pure shard plan,
//! and telemetry set-up. Nothing here knows about gRPC or libtorch.

pub mod dataset;
pub mod ids;
pub mod jobspec;
pub mod store;
pub mod telemetry;

/// Milliseconds since the Unix epoch, for timestamps in store records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
