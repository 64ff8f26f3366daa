//! The Ringmaster worker as a library, so integration tests and benchmarks can
//! drive its parts directly: the agent (gRPC session), the trainer (libtorch
//! on a dedicated thread), models, optimizers and collectives.

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod model;
pub mod optim;
pub mod sample_rng;
pub mod trainer;
