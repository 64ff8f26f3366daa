//! State transfer: one rank's full training state (parameters, buffers,
//! optimizer state, step and metrics) copied to every other rank of a new group, so a
//! newcomer joins a running job, or a group re-forms, without a checkpoint.
//!
//! The source first broadcasts a bincode [`StateHeader`] naming every tensor
//! with its shape, carrying the model's (small, typed) buffers whole, and a
//! sha256 over all of their bytes; then the tensors go
//! in flat chunks of at most [`BUCKET_BYTES`](super::BUCKET_BYTES). Every
//! receiver checks the names and shapes against its own model before any
//! data moves and the checksum after, so a rank never trains on state that
//! did not arrive intact.

use super::TrainError;
use super::buffers::{self, BufferImage};
use super::grads::bucket_ranges;
use crate::collective::Collective;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Bumped when the header or the order of tensors changes.
const TRANSFER_VERSION: u32 = 2;
/// Largest header accepted from a source (names and shapes of a model with
/// hundreds of thousands of tensors fit).
const MAX_HEADER_BYTES: usize = 64 << 20;

/// What the source announces before the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateHeader {
    pub version: u32,
    pub job_id: String,
    /// Optimizer steps completed: the data cursor of the state.
    pub step: u64,
    pub optimizer_steps: u64,
    pub metrics: BTreeMap<String, f64>,
    /// Every tensor in transfer order with its shape: the parameters in name
    /// order, then the optimizer state by name.
    pub tensors: Vec<(String, Vec<i64>)>,
    /// The model's buffers (BatchNorm's running statistics), in name order.
    pub buffers: Vec<BufferImage>,
    /// sha256 over the (little-endian) fp32 bytes of every tensor, in order,
    /// then over the buffers' bytes.
    pub sha256: [u8; 32],
}

/// The parts of a run's state that travel.
pub struct State<'a> {
    pub job_id: &'a str,
    pub step: u64,
    pub optimizer_steps: u64,
    pub metrics: &'a BTreeMap<String, f64>,
    /// Parameters in name order.
    pub params: &'a [(String, Tensor)],
    /// Buffers in name order: the source's are sent, a receiver's overwritten.
    pub buffers: &'a [(String, Tensor)],
    /// Optimizer state tensors by name (empty on a rank that has none yet).
    pub optimizer: Vec<(String, Tensor)>,
}

/// What a receiver got: the source's header and its optimizer state
/// tensors, on the receiver's device; the parameters and buffers were
/// written in place.
pub struct Received {
    pub header: StateHeader,
    pub optimizer: Vec<(String, Tensor)>,
}

/// How much moved and how long it took, for the job's event timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transferred {
    pub bytes: u64,
    pub seconds: f64,
}

/// Copies `source`'s state to every rank. The source passes its state and
/// gets `None`; every other rank passes its own (for the parameter tensors
/// to overwrite) and gets what arrived.
pub fn transfer(
    group: &mut dyn Collective,
    source: u32,
    state: State<'_>,
    device: Device,
    chunk_bytes: usize,
) -> Result<(Option<Received>, Transferred), TrainError> {
    let started = Instant::now();
    let is_source = group.rank() == source;
    let mut header_bytes = if is_source {
        let mut tensors = Vec::new();
        let mut hasher = Sha256::new();
        for (name, t) in state.params.iter().chain(state.optimizer.iter()) {
            tensors.push((name.clone(), t.size()));
            hash_tensor(&mut hasher, t)?;
        }
        let buffers = buffers::images(state.buffers)?;
        for b in &buffers {
            hasher.update(&b.bytes);
        }
        let header = StateHeader {
            version: TRANSFER_VERSION,
            job_id: state.job_id.to_string(),
            step: state.step,
            optimizer_steps: state.optimizer_steps,
            metrics: state.metrics.clone(),
            tensors,
            buffers,
            sha256: hasher.finalize().into(),
        };
        bincode::serde::encode_to_vec(&header, bincode::config::standard())
            .map_err(|e| TrainError::Transfer(format!("encoding the state header: {e}")))?
    } else {
        Vec::new()
    };
    group.broadcast_bytes(&mut header_bytes, source, MAX_HEADER_BYTES)?;
    let (header, _): (StateHeader, usize) =
        bincode::serde::decode_from_slice(&header_bytes, bincode::config::standard())
            .map_err(|e| TrainError::Transfer(format!("decoding the state header: {e}")))?;
    check_header(&header, &state)?;

    // The receiver's tensors in transfer order: its own parameters (written
    // in place) and fresh optimizer state shaped as announced.
    let mut targets: Vec<Tensor> = state
        .params
        .iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let mut optimizer = Vec::new();
    if is_source {
        targets.extend(state.optimizer.iter().map(|(_, t)| t.shallow_clone()));
    } else {
        for (name, shape) in &header.tensors[state.params.len()..] {
            let t = crate::model::zeros("received optimizer state", shape, Kind::Float, device)?;
            targets.push(t.shallow_clone());
            optimizer.push((name.clone(), t));
        }
    }

    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for range in bucket_ranges(&targets, chunk_bytes) {
        let part = &targets[range];
        let views = part
            .iter()
            .map(|t| t.f_view([-1]))
            .collect::<Result<Vec<_>, _>>()?;
        let mut flat = tch::no_grad(|| Tensor::f_cat(&views, 0))?;
        group.broadcast(&mut flat, source)?;
        if !is_source {
            hash_tensor(&mut hasher, &flat)?;
            tch::no_grad(|| -> Result<(), TrainError> {
                let mut off = 0;
                for t in part {
                    let k = t.numel() as i64;
                    let piece = flat.f_narrow(0, off, k)?.f_view(t.size().as_slice())?;
                    t.shallow_clone().f_copy_(&piece)?;
                    off += k;
                }
                Ok(())
            })?;
        }
        bytes += flat.numel() as u64 * 4;
    }
    let done = Transferred {
        bytes: bytes + header_bytes.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    };
    if is_source {
        return Ok((None, done));
    }
    for b in &header.buffers {
        hasher.update(&b.bytes);
    }
    let got: [u8; 32] = hasher.finalize().into();
    if got != header.sha256 {
        return Err(TrainError::Transfer(format!(
            "state from rank {source} failed its checksum: sha256 {} announced, {} received",
            hex(&header.sha256),
            hex(&got)
        )));
    }
    buffers::restore(&header.buffers, state.buffers)?;
    Ok((Some(Received { header, optimizer }), done))
}

/// Refuses state that is not this job's or does not fit this model.
fn check_header(h: &StateHeader, mine: &State<'_>) -> Result<(), TrainError> {
    if h.version != TRANSFER_VERSION {
        return Err(TrainError::Transfer(format!(
            "state transfer version {} from the source, this worker speaks {TRANSFER_VERSION}",
            h.version
        )));
    }
    if h.job_id != mine.job_id {
        return Err(TrainError::Transfer(format!(
            "state of job {} offered to job {}",
            h.job_id, mine.job_id
        )));
    }
    if h.tensors.len() < mine.params.len() {
        return Err(TrainError::Transfer(format!(
            "the source sent {} tensors, the model has {} parameters",
            h.tensors.len(),
            mine.params.len()
        )));
    }
    for ((name, shape), (mine_name, t)) in h.tensors.iter().zip(mine.params) {
        if name != mine_name || *shape != t.size() {
            return Err(TrainError::Transfer(format!(
                "the source's parameter `{name}` {shape:?} does not match this model's `{mine_name}` {:?}",
                t.size()
            )));
        }
    }
    buffers::check(&h.buffers, mine.buffers)
        .map_err(|e| TrainError::Transfer(format!("the source's buffers: {e}")))
}

/// Feeds a tensor's fp32 values (from any device) to `hasher`.
fn hash_tensor(hasher: &mut Sha256, t: &Tensor) -> Result<(), TrainError> {
    let host = crate::checkpoint::HostTensor::copy_of("", &t.f_to_kind(Kind::Float)?)?;
    // Native byte order: every platform libtorch supports is little-endian.
    hasher.update(host.bytes().0);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{AbortHandle, CollectiveError};

    /// One side of a two-rank group, in memory: as the source it records
    /// what it sends; as a receiver it replays a recording, optionally with
    /// one value changed on the way.
    struct Tape {
        rank: u32,
        header: Vec<u8>,
        chunks: Vec<Vec<f32>>,
        next: usize,
        corrupt: bool,
    }

    impl Collective for Tape {
        fn rank(&self) -> u32 {
            self.rank
        }
        fn world_size(&self) -> u32 {
            2
        }
        fn generation(&self) -> u64 {
            1
        }
        fn all_reduce_sum(&mut self, _: &mut Tensor) -> Result<(), CollectiveError> {
            unreachable!("a transfer only broadcasts")
        }
        fn broadcast(&mut self, flat: &mut Tensor, _root: u32) -> Result<(), CollectiveError> {
            if self.rank == 0 {
                self.chunks.push(Vec::<f32>::try_from(&*flat).unwrap());
            } else {
                let mut data = self.chunks[self.next].clone();
                self.next += 1;
                if self.corrupt {
                    data[0] += 1.0;
                }
                flat.copy_(&Tensor::from_slice(&data));
            }
            Ok(())
        }
        fn broadcast_bytes(
            &mut self,
            bytes: &mut Vec<u8>,
            _root: u32,
            _max: usize,
        ) -> Result<(), CollectiveError> {
            if self.rank == 0 {
                self.header = bytes.clone();
            } else {
                *bytes = self.header.clone();
            }
            Ok(())
        }
        fn barrier(&mut self) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn abort_handle(&self) -> AbortHandle {
            AbortHandle::new()
        }
    }

    fn params(seed: i64) -> Vec<(String, Tensor)> {
        tch::manual_seed(seed);
        vec![
            (
                "a.weight".into(),
                Tensor::randn([3, 2], (Kind::Float, Device::Cpu)),
            ),
            (
                "a.bias".into(),
                Tensor::randn([3], (Kind::Float, Device::Cpu)),
            ),
        ]
    }

    /// A BatchNorm's buffers.
    fn bufs(count: i64, mean: f32) -> Vec<(String, Tensor)> {
        vec![
            ("n.num_batches_tracked".into(), Tensor::from(count)),
            ("n.running_mean".into(), Tensor::from_slice(&[mean; 4])),
        ]
    }

    fn send(ps: &[(String, Tensor)], metrics: &BTreeMap<String, f64>) -> Tape {
        let mut tape = Tape {
            rank: 0,
            header: Vec::new(),
            chunks: Vec::new(),
            next: 0,
            corrupt: false,
        };
        let state = State {
            job_id: "j",
            step: 7,
            optimizer_steps: 7,
            metrics,
            params: ps,
            buffers: &bufs(41, 0.25),
            optimizer: vec![(
                "a.bias.exp_avg".into(),
                Tensor::ones([3], (Kind::Float, Device::Cpu)),
            )],
        };
        // Small chunks, so the data goes in several broadcasts.
        let (got, moved) = transfer(&mut tape, 0, state, Device::Cpu, 8).unwrap();
        assert!(got.is_none());
        assert!(moved.bytes >= 4 * 12);
        assert!(tape.chunks.len() > 1);
        tape
    }

    type Receiver = (
        Vec<(String, Tensor)>,
        Vec<(String, Tensor)>,
        Result<Received, TrainError>,
    );

    fn receive(tape: Tape, corrupt: bool) -> Receiver {
        let mut tape = Tape {
            rank: 1,
            corrupt,
            ..tape
        };
        let mine = params(2);
        let my_buffers = bufs(0, 0.0);
        let metrics = BTreeMap::new();
        let state = State {
            job_id: "j",
            step: 0,
            optimizer_steps: 0,
            metrics: &metrics,
            params: &mine,
            buffers: &my_buffers,
            optimizer: Vec::new(),
        };
        let got = transfer(&mut tape, 0, state, Device::Cpu, 8).map(|(r, _)| r.unwrap());
        (mine, my_buffers, got)
    }

    #[test]
    fn a_receiver_gets_every_tensor_and_the_cursor() {
        let source = params(1);
        let metrics = BTreeMap::from([("loss".to_string(), 0.5)]);
        let (mine, buffers, got) = receive(send(&source, &metrics), false);
        let got = got.unwrap();
        assert_eq!(got.header.step, 7);
        assert_eq!(got.header.metrics, metrics);
        for ((_, a), (_, b)) in mine.iter().zip(&source) {
            assert!(a.equal(b));
        }
        for ((_, a), (_, b)) in buffers.iter().zip(&bufs(41, 0.25)) {
            assert!(a.equal(b));
        }
        assert_eq!(got.optimizer.len(), 1);
        assert_eq!(got.optimizer[0].0, "a.bias.exp_avg");
        assert!(
            got.optimizer[0]
                .1
                .equal(&Tensor::ones([3], (Kind::Float, Device::Cpu)))
        );
    }

    #[test]
    fn state_changed_in_flight_fails_its_checksum() {
        let source = params(1);
        let (_, _, got) = receive(send(&source, &BTreeMap::new()), true);
        let e = got.err().expect("refused").to_string();
        assert!(e.contains("failed its checksum"), "{e}");
    }
}
