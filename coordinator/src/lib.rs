//! The Ringmaster coordinator as a library: the CLI, the gRPC services, the
//! control loop (single owner of the cluster model) and the pure scheduler.
//! The coordinator knows nothing of libtorch.

#![forbid(unsafe_code)]

pub mod cli;
pub mod control;
pub mod election;
pub mod scheduler;
pub mod server;
