//! The message that carries a generation's NCCL unique id from rank 0 to the other ranks.
//!
//! It travels over the generation's ring, whose handshake already fences stale generations,
//! and restates what the communicator is for (job, generation, world size) and which NCCL made
//! the id: NCCL's bootstrap trusts whatever id it is handed, and two ranks with different NCCL
//! versions can hang in their first collective instead of failing, so both are checked here,
//! before any rank calls `ncclCommInitRank`.

use crate::collective::CollectiveError;
use serde::{Deserialize, Serialize};

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;
/// Longest encoded message a rank accepts.
pub const MAX_LEN: usize = 1024;

/// Rank 0's announcement of the communicator for one generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    /// The job the communicator belongs to.
    pub job: String,
    /// Its generation: one communicator per generation, never reused.
    pub generation: u64,
    /// Ranks in the communicator.
    pub world_size: u32,
    /// `ncclGetVersion` on rank 0.
    pub nccl_version: i32,
    /// The id from `ncclGetUniqueId` on rank 0.
    pub unique_id: Vec<u8>,
}

impl Rendezvous {
    /// The message as sent (bincode, standard configuration).
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("a struct of plain fields always encodes")
    }

    /// Decodes rank 0's message and checks it against what this rank joined; returns the id.
    pub fn accept(
        bytes: &[u8],
        job: &str,
        generation: u64,
        world_size: u32,
        nccl_version: i32,
    ) -> Result<[u8; ID_BYTES], CollectiveError> {
        let protocol = |detail: String| CollectiveError::Protocol { rank: 0, detail };
        let (r, used): (Rendezvous, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| protocol(format!("undecodable NCCL rendezvous: {e}")))?;
        if used != bytes.len() {
            return Err(protocol(format!(
                "NCCL rendezvous has {} trailing bytes",
                bytes.len() - used
            )));
        }
        if r.job != job || r.generation != generation {
            // The ring's handshake makes this unreachable between honest peers; checked anyway
            // because a communicator of another generation must never be joined.
            return Err(CollectiveError::StaleGeneration {
                job: r.job,
                generation: r.generation,
            });
        }
        if r.world_size != world_size {
            return Err(protocol(format!(
                "NCCL rendezvous for {} ranks, this rank joined a group of {world_size}",
                r.world_size
            )));
        }
        if r.nccl_version != nccl_version {
            return Err(CollectiveError::InvalidConfig(format!(
                "NCCL versions differ: rank 0 runs {}, this rank {}; every rank of a job must \
                 load the same NCCL",
                super::library::version_text(r.nccl_version),
                super::library::version_text(nccl_version)
            )));
        }
        r.unique_id
            .as_slice()
            .try_into()
            .map_err(|_| protocol(format!("NCCL unique id of {} bytes", r.unique_id.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Rendezvous {
        Rendezvous {
            job: "job-1".into(),
            generation: 7,
            world_size: 4,
            nccl_version: 22809,
            unique_id: (0..ID_BYTES as u8).collect(),
        }
    }

    #[test]
    fn the_id_reaches_a_rank_of_the_same_generation() {
        let bytes = msg().encode();
        assert!(bytes.len() <= MAX_LEN);
        let id = Rendezvous::accept(&bytes, "job-1", 7, 4, 22809).unwrap();
        assert_eq!(id.to_vec(), msg().unique_id);
    }

    #[test]
    fn another_generation_or_job_is_stale() {
        let bytes = msg().encode();
        for (job, generation) in [("job-1", 8), ("job-2", 7)] {
            let err = Rendezvous::accept(&bytes, job, generation, 4, 22809).unwrap_err();
            assert!(
                matches!(err, CollectiveError::StaleGeneration { generation: 7, .. }),
                "{err}"
            );
            assert!(!err.retryable());
        }
    }

    #[test]
    fn world_size_version_and_id_length_are_checked() {
        let err = Rendezvous::accept(&msg().encode(), "job-1", 7, 3, 22809).unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol violation by rank 0: NCCL rendezvous for 4 ranks, this rank joined a group of 3"
        );
        let err = Rendezvous::accept(&msg().encode(), "job-1", 7, 4, 22703).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid collective config: NCCL versions differ: rank 0 runs 2.28.9, this rank \
             2.27.3; every rank of a job must load the same NCCL"
        );
        let mut short = msg();
        short.unique_id.truncate(100);
        let err = Rendezvous::accept(&short.encode(), "job-1", 7, 4, 22809).unwrap_err();
        assert!(
            err.to_string().ends_with("NCCL unique id of 100 bytes"),
            "{err}"
        );
        let mut bytes = msg().encode();
        bytes.push(0);
        let err = Rendezvous::accept(&bytes, "job-1", 7, 4, 22809).unwrap_err();
        assert!(err.to_string().ends_with("1 trailing bytes"), "{err}");
        let err = Rendezvous::accept(&bytes[..10], "job-1", 7, 4, 22809).unwrap_err();
        assert!(err.to_string().contains("undecodable"), "{err}");
    }
}
