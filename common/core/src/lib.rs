//! Ringmaster's shared domain types: ids, the validated job spec, the records
//! kept in the state store, workers' devices and states, and telemetry set-up.
//! Every crate links this one, so it holds only what they all need: the store
//! backends, datasets and checkpoints are crates of their own
//! (`ringmaster-store`, `ringmaster-dataset`, `ringmaster-checkpoint`), so the
//! worker does not link etcd or the dataset packers.

#![forbid(unsafe_code)]

pub mod ids;
pub mod jobspec;
pub mod records;
pub mod telemetry;
pub mod worker;

/// Milliseconds since the Unix epoch, for timestamps in store records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
