//! Checkpoints as the trainer sees them: a snapshot of model and optimizer
//! state copied to host memory at a step boundary, serialized to safetensors
//! and written on a background thread while training continues (the atomic
//! write itself is `ringmaster_checkpoint::write_checkpoint`), and the
//! restore path that verifies a checkpoint before loading it.
//!
//! Nothing here talks to the coordinator: results come back as values the
//! trainer turns into events.

use ringmaster_checkpoint::{self as ckpt, CheckpointError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// `state.json`: everything besides tensors that a resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format_version: u32,
    pub job_id: String,
    /// Optimizer steps completed; training resumes at this global step.
    pub step: u64,
    /// The data cursor: epoch and step within it of the next step to run.
    pub epoch: u64,
    pub step_in_epoch: u64,
    pub global_batch: u64,
    pub world_size: u32,
    pub generation: u64,
    pub seed: u64,
    pub optimizer: String,
    pub optimizer_steps: u64,
    pub learning_rate: f64,
    /// The learning-rate schedule and its state (constant for now).
    pub lr_schedule: String,
    /// How randomness is reproduced: libtorch's RNG is re-seeded from
    /// (seed, step, rank) every step, so no generator state is stored.
    pub rng: String,
    pub metrics: BTreeMap<String, f64>,
}

/// A tensor copied to host memory.
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// A host tensor's values: f32, or i64 for integer buffers (BatchNorm's
/// `num_batches_tracked`, which PyTorch keeps as i64).
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl HostTensor {
    /// Copies a tensor (from any device) into host memory: i64 as i64,
    /// anything else as f32.
    pub fn copy_of(name: &str, t: &Tensor) -> Result<Self, tch::TchError> {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let n = t.numel();
        let data = if t.kind() == Kind::Int64 {
            let mut v = vec![0i64; n];
            t.f_copy_data(&mut v, n)?;
            HostData::I64(v)
        } else {
            let t = t.f_to_kind(Kind::Float)?;
            let mut v = vec![0f32; n];
            t.f_copy_data(&mut v, n)?;
            HostData::F32(v)
        };
        Ok(HostTensor {
            name: name.to_string(),
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }

    /// The values' bytes in native (little-endian) order, and their safetensors type.
    pub fn bytes(&self) -> (&[u8], safetensors::Dtype) {
        match &self.data {
            HostData::F32(v) => (bytemuck::cast_slice(v), safetensors::Dtype::F32),
            HostData::I64(v) => (bytemuck::cast_slice(v), safetensors::Dtype::I64),
        }
    }
}

/// Everything one checkpoint holds, already in host memory.
pub struct Snapshot {
    pub root: PathBuf,
    pub job_id: String,
    pub step: u64,
    pub model: Vec<HostTensor>,
    pub optimizer: Vec<HostTensor>,
    pub state: TrainState,
}

/// What became of one checkpoint write.
#[derive(Debug)]
pub struct WriteResult {
    pub step: u64,
    pub outcome: Result<Written, String>,
}

/// A checkpoint on disk, complete with its manifest.
#[derive(Clone, Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
}

fn serialize(tensors: &[HostTensor]) -> Result<Vec<u8>, String> {
    let views = tensors
        .iter()
        .map(|t| {
            let (bytes, dtype) = t.bytes();
            safetensors::tensor::TensorView::new(dtype, t.shape.clone(), bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| format!("{}: {e}", t.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Serializes and writes a snapshot (atomically, manifest last).
pub fn write(snapshot: &Snapshot) -> WriteResult {
    let start = Instant::now();
    let outcome = (|| {
        let model = serialize(&snapshot.model)?;
        let optimizer = serialize(&snapshot.optimizer)?;
        let state = serde_json::to_vec_pretty(&snapshot.state).map_err(|e| e.to_string())?;
        let manifest = ckpt::write_checkpoint(
            &snapshot.root,
            &snapshot.job_id,
            snapshot.step,
            &[
                (MODEL_FILE, &model),
                (OPTIMIZER_FILE, &optimizer),
                (STATE_FILE, &state),
            ],
        )
        .map_err(|e| e.to_string())?;
        Ok(Written {
            dir: ckpt::step_dir(&snapshot.root, &snapshot.job_id, snapshot.step),
            bytes: manifest.total_bytes(),
            seconds: start.elapsed().as_secs_f64(),
        })
    })();
    WriteResult {
        step: snapshot.step,
        outcome,
    }
}

/// A background writer: one write at a time. `submit` blocks while a write is
/// in progress, so a second checkpoint waits for the first (and host memory
/// holds at most one snapshot being written plus the one being taken).
pub struct Writer {
    tx: Option<mpsc::SyncSender<Snapshot>>,
    results: mpsc::Receiver<WriteResult>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Snapshot>(0);
        let (done_tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for snapshot in rx {
                    if done_tx.send(write(&snapshot)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Writer {
            tx: Some(tx),
            results,
            thread: Some(thread),
        })
    }

    /// Hands a snapshot to the writer, waiting while it is busy.
    pub fn submit(&self, snapshot: Snapshot) -> Result<(), String> {
        match &self.tx {
            Some(tx) => tx
                .send(snapshot)
                .map_err(|_| "the checkpoint writer stopped".to_string()),
            None => Err("the checkpoint writer is closed".into()),
        }
    }

    /// Results of writes finished so far.
    pub fn finished(&self) -> Vec<WriteResult> {
        self.results.try_iter().collect()
    }

    /// Waits for every submitted write and returns their results.
    pub fn finish(&mut self) -> Vec<WriteResult> {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.results.try_iter().collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A verified checkpoint loaded into tensors (on the CPU).
pub struct Loaded {
    pub dir: PathBuf,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
}

/// Verifies the checkpoint in `dir` (sha256 of every file against its
/// manifest) and loads it.
pub fn load(dir: &Path) -> Result<Loaded, String> {
    ckpt::verify_checkpoint(dir).map_err(|e: CheckpointError| e.to_string())?;
    let read = |name: &str| -> Result<HashMap<String, Tensor>, String> {
        Tensor::read_safetensors(dir.join(name))
            .map(|v| v.into_iter().collect())
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let model = read(MODEL_FILE)?;
    let optimizer = read(OPTIMIZER_FILE)?;
    let state_path = dir.join(STATE_FILE);
    let state_bytes =
        std::fs::read(&state_path).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let state: TrainState = serde_json::from_slice(&state_bytes)
        .map_err(|e| format!("{}: {e}", state_path.display()))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        model,
        optimizer,
        state,
    })
}
