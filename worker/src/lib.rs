//! The Ringmaster worker as a library, so integration tests and benchmarks can
//! drive its parts directly: the agent (gRPC session), the trainer (libtorch
//! on a dedicated thread), models, optimizers and collectives.
//!
//! Unsafe code is denied here except where a collective reads a tensor's
//! memory as a slice (`collective/ring_backend.rs`), each use with its
//! safety argument.

#![deny(unsafe_code)]

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod host;
pub mod model;
pub mod optim;
pub mod sample_rng;
pub mod trainer;
