//! Where a run's samples come from: the training set, either loaded whole
//! (held on the model's device and gathered by dataset sample id) or
//! streamed a window of shards at a time ([`super::stream`]), and the
//! validation set (loaded, or read a shard at a time, and copied to the
//! device a chunk at a time when evaluated). `data.loading` picks; both
//! give the same samples, so a job's results do not depend on it. The run
//! asks for samples by id and never touches the arrays. Labels are i64
//! class labels `[n]` or f32 regression targets `[n, k]`, as the dataset
//! holds them; the job's `[task]` must match (checked at load).
//!
//! A free worker may load a running job's data ahead of time ([`prepare`],
//! on the coordinator's `PrepareJob`): a spare that later replaces a lost
//! member then joins without reading and verifying the dataset, which is
//! most of what a newcomer costs a recovery. The prepared data is taken by
//! the next run whose datasets, device and manifests are the same.

use super::TrainError;
use super::stream::{StreamStats, StreamedData};
use crate::model;
use ringmaster_common::jobspec::{JobSpec, ModelSpec, TaskSpec};
use ringmaster_dataset::{
    Dataset, DatasetManifest, LabelKind, LabelRows, Labels, LocalDir, MANIFEST_FILE, ShardPlan,
    read_shard,
};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex};
use tch::{Device, Tensor};

/// Evaluation runs in chunks of this many samples to bound memory.
const EVAL_CHUNK: usize = 4096;

/// The training and validation data of one run.
pub(super) struct TrainData {
    train: Source,
    plan: ShardPlan,
    samples: u64,
    /// Features per sample.
    pub features: usize,
    /// Class labels (and how many classes) or regression targets (how
    /// many per sample).
    pub labels: LabelKind,
    validation: Option<Validation>,
    device: Device,
}

/// How the training set is held.
enum Source {
    /// Every sample, on the model's device.
    Memory {
        xs: Tensor,
        ys: Tensor,
    },
    Stream(StreamedData),
}

/// How the validation set is held.
enum Validation {
    Memory(Dataset),
    /// Read a shard at a time at each evaluation.
    Stream {
        dir: PathBuf,
        manifest: DatasetManifest,
    },
}

impl Validation {
    fn samples(&self) -> u64 {
        match self {
            Validation::Memory(d) => d.len() as u64,
            Validation::Stream { manifest, .. } => manifest.num_samples,
        }
    }

    fn features(&self) -> usize {
        match self {
            Validation::Memory(d) => d.features,
            Validation::Stream { manifest, .. } => manifest.features(),
        }
    }

    fn labels(&self) -> LabelKind {
        match self {
            Validation::Memory(d) => d.manifest.labels(),
            Validation::Stream { manifest, .. } => manifest.labels(),
        }
    }
}

/// Refuses a job whose `[task]` does not fit the labels its training set
/// holds: a regression job on class labels, or the other way round.
pub(super) fn check_task(task: &TaskSpec, labels: LabelKind, dir: &Path) -> Result<(), TrainError> {
    match (task, labels) {
        (TaskSpec::Classification { .. }, LabelKind::Classes(_))
        | (TaskSpec::Regression { .. }, LabelKind::Targets(_))
        | (TaskSpec::LanguageModel, LabelKind::Tokens { .. }) => Ok(()),
        (task, labels) => Err(TrainError::Invalid(format!(
            "task.kind = \"{}\" needs {}, but the training set {} holds {labels}",
            task.kind(),
            match task {
                TaskSpec::Classification { .. } => "class labels (an i64 `y`)",
                TaskSpec::Regression { .. } => "regression targets (an f32 `y`)",
                TaskSpec::LanguageModel =>
                    "token sequences (an i64 `y` of shape [T], from dataset pack --text)",
            },
            dir.display()
        ))),
    }
}

/// A `cnn` on an image dataset must take the images' own `[C, H, W]`: one of
/// the same size but another layout would run on scrambled pixels without
/// any error. The coordinator refuses this at submit; this holds for a job
/// that reached the worker another way, and for `worker evaluate`.
pub(super) fn check_image_shape(
    spec: &JobSpec,
    manifest: &DatasetManifest,
    dir: &Path,
) -> Result<(), TrainError> {
    match (&spec.model, manifest.image_shape()) {
        (ModelSpec::Cnn { input_shape, .. }, Some(shape))
            if input_shape.map(|v| v as usize) != shape =>
        {
            Err(TrainError::Invalid(format!(
                "model.input_shape is {input_shape:?} but {} holds images of [C, H, W] = \
                 {shape:?}",
                dir.display()
            )))
        }
        _ => Ok(()),
    }
}

/// The labels of a batch as a tensor: i64 `[n]` or f32 `[n, k]`.
pub(super) fn labels_tensor(rows: LabelRows<'_>) -> Result<Tensor, TrainError> {
    Ok(match rows {
        LabelRows::Classes(y) => Tensor::f_from_slice(y)?,
        LabelRows::Targets { width, values } => Tensor::f_from_slice(values)?
            .f_view([(values.len() / width.max(1)) as i64, width as i64])?,
        LabelRows::Tokens { len, values } => Tensor::f_from_slice(values)?
            .f_view([(values.len() / len.max(1)) as i64, len as i64])?,
    })
}

/// Which data a prepared load holds: the dataset folders, the device, and
/// their manifests as read before loading (a dataset rewritten since does
/// not match: its manifest names other shard checksums).
#[derive(Clone, Debug, PartialEq)]
struct DataKey {
    train: PathBuf,
    validation: Option<PathBuf>,
    device: Device,
    manifests: Vec<Vec<u8>>,
}

impl DataKey {
    fn of(spec: &JobSpec, device: Device) -> Option<DataKey> {
        let read = |dir: &Path| std::fs::read(dir.join(MANIFEST_FILE)).ok();
        let mut manifests = vec![read(&spec.data.train)?];
        if let Some(v) = &spec.data.validation {
            manifests.push(read(v)?);
        }
        Some(DataKey {
            train: spec.data.train.clone(),
            validation: spec.data.validation.clone(),
            device,
            manifests,
        })
    }
}

/// The one prepared load a worker holds (a spare prepares for one job).
#[derive(Default)]
struct Prepared {
    key: Option<DataKey>,
    loading: bool,
    data: Option<TrainData>,
}

static PREPARED: LazyLock<(Mutex<Prepared>, Condvar)> =
    LazyLock::new(|| (Mutex::new(Prepared::default()), Condvar::new()));

fn prepared() -> std::sync::MutexGuard<'static, Prepared> {
    PREPARED.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads `spec`'s data on `device` in the background, replacing whatever
/// was prepared before, unless it is prepared (or being prepared) already.
/// A failure is only logged: the run that needs the data loads it again and
/// reports the error then.
pub fn prepare(spec: &JobSpec, device: Device) {
    let Some(key) = DataKey::of(spec, device) else {
        return;
    };
    {
        let mut p = prepared();
        if p.key.as_ref() == Some(&key) {
            return;
        }
        *p = Prepared {
            key: Some(key.clone()),
            loading: true,
            data: None,
        };
    }
    let spec = spec.clone();
    let spawned = std::thread::Builder::new()
        .name("prepare-data".into())
        .spawn(move || {
            let loaded = TrainData::load(&spec, device);
            if let Err(e) = &loaded {
                tracing::warn!("could not prepare the data of a job this worker may join: {e}");
            }
            let mut p = prepared();
            // Still the load asked for (a newer request replaced it otherwise).
            if p.key.as_ref() == Some(&key) {
                p.loading = false;
                p.data = loaded.ok();
                if p.data.is_none() {
                    p.key = None;
                }
            }
            PREPARED.1.notify_all();
        });
    if spawned.is_err() {
        *prepared() = Prepared::default();
    }
}

/// Whether data for `spec` on `device` is prepared (or being prepared).
pub fn is_prepared(spec: &JobSpec, device: Device) -> bool {
    let key = DataKey::of(spec, device);
    key.is_some() && prepared().key == key
}

impl TrainData {
    /// The job's data: what [`prepare`] loaded for it (waiting for a load
    /// in progress), else loaded now. Either way nothing stays prepared: a
    /// worker that trains holds one copy of data, not two.
    pub fn prepared_or_load(spec: &JobSpec, device: Device) -> Result<Self, TrainError> {
        let key = DataKey::of(spec, device);
        let mut p = prepared();
        while p.loading && key.is_some() && p.key == key {
            p = PREPARED.1.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        // Another job's load in progress sees its key gone and discards it.
        let held = std::mem::take(&mut *p);
        drop(p);
        if key.is_some()
            && held.key == key
            && let Some(data) = held.data
        {
            tracing::debug!("using the data prepared ahead of the start");
            return Ok(data);
        }
        drop(held);
        TrainData::load(spec, device)
    }

    /// Opens the job's datasets: the training set loaded whole (verified,
    /// on `device`) or streamed, as `data.loading` says; the validation set
    /// likewise.
    pub fn load(spec: &JobSpec, device: Device) -> Result<Self, TrainError> {
        let data = &spec.data;
        let manifest = DatasetManifest::read(&data.train)?;
        let plan = ShardPlan::with_shards(
            &manifest.shard_samples(),
            u64::from(spec.train.global_batch),
            spec.seed,
            data.shuffle_window_shards,
        )
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let features = manifest.features();
        let labels = manifest.labels();
        check_task(&spec.task, labels, &data.train)?;
        check_image_shape(spec, &manifest, &data.train)?;
        let samples = manifest.num_samples;
        let validation = match &data.validation {
            None => None,
            Some(dir) => {
                let v = DatasetManifest::read(dir)?;
                if data.loading.streams(v.decoded_bytes(), data.cache_bytes) {
                    Some(Validation::Stream {
                        dir: dir.clone(),
                        manifest: v,
                    })
                } else {
                    Some(Validation::Memory(Dataset::load_with(dir, v)?))
                }
            }
        };
        if let Some(v) = &validation
            && v.features() != features
        {
            return Err(TrainError::Invalid(format!(
                "validation set has {} features, training set {features}",
                v.features()
            )));
        }
        if let Some(v) = &validation {
            let fits = match (v.labels(), labels) {
                (LabelKind::Classes(vc), LabelKind::Classes(tc)) => vc <= tc,
                (vl, tl) => vl == tl,
            };
            if !fits {
                return Err(TrainError::Invalid(format!(
                    "validation set holds {}, training set {labels}",
                    v.labels()
                )));
            }
        }
        let train = if data
            .loading
            .streams(manifest.decoded_bytes(), data.cache_bytes)
        {
            let stream = StreamedData::open(
                manifest,
                Box::new(LocalDir(data.train.clone())),
                plan.clone(),
                data.cache_bytes,
            )?;
            let window = stream.window_bytes();
            if window > data.cache_bytes {
                return Err(TrainError::Invalid(format!(
                    "data.cache_bytes ({}) cannot hold one shuffle window: {} shards of this \
                     dataset decode to {}; raise data.cache_bytes (twice the window lets \
                     reads overlap training) or lower data.shuffle_window_shards",
                    mib(data.cache_bytes),
                    plan.window_shards(),
                    mib(window)
                )));
            }
            tracing::info!(
                shards = plan.num_shards(),
                window_shards = plan.window_shards(),
                cache_mib = data.cache_bytes >> 20,
                "streaming the training set"
            );
            Source::Stream(stream)
        } else {
            let train = Dataset::load_with(&data.train, manifest)?;
            let n = train.len() as i64;
            let xs = model::from_host("training inputs", &train.x, &[n, features as i64], device)?;
            let ys = match &train.y {
                Labels::Classes(y) => model::from_host("training labels", y, &[n], device)?,
                Labels::Targets { width, values } => {
                    model::from_host("training targets", values, &[n, *width as i64], device)?
                }
                Labels::Tokens { len, values } => {
                    model::from_host("training tokens", values, &[n, *len as i64], device)?
                }
            };
            Source::Memory { xs, ys }
        };
        Ok(TrainData {
            train,
            plan,
            samples,
            features,
            labels,
            validation,
            device,
        })
    }

    /// The job's data order over this training set.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// Number of training samples.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Says where the run is (the next batch starts at order position
    /// `position` of epoch `epoch`), so a streamed set reads ahead.
    pub fn advance(&self, epoch: u64, position: u64) {
        if let Source::Stream(s) = &self.train {
            s.advance(epoch, position);
        }
    }

    /// Streaming figures, when the training set is streamed.
    pub fn stream_stats(&self) -> Option<StreamStats> {
        match &self.train {
            Source::Stream(s) => Some(s.stats()),
            Source::Memory { .. } => None,
        }
    }

    /// Inputs and labels (i64 `[n]`) or targets (f32 `[n, k]`) of the
    /// training samples `ids`, in that order, on the model's device.
    pub fn batch(&self, ids: &[u64]) -> Result<(Tensor, Tensor), TrainError> {
        match &self.train {
            Source::Memory { xs, ys } => {
                let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                let idx = Tensor::f_from_slice(&idx)?.f_to_device(self.device)?;
                Ok((xs.f_index_select(0, &idx)?, ys.f_index_select(0, &idx)?))
            }
            Source::Stream(s) => {
                let (x, y) = s.gather(ids)?;
                let n = ids.len() as i64;
                let xb = to_device(
                    Tensor::f_from_slice(&x)?.f_view([n, self.features as i64])?,
                    self.device,
                )?;
                let yb = to_device(labels_tensor(y.rows())?, self.device)?;
                Ok((xb, yb))
            }
        }
    }

    /// Size of the validation set, if there is one.
    pub fn validation_samples(&self) -> Option<u64> {
        self.validation.as_ref().map(Validation::samples)
    }

    /// Calls `f` with inputs and labels of consecutive chunks of the
    /// validation samples `range` (empty without a validation set).
    pub fn for_validation_chunks(
        &self,
        range: Range<u64>,
        mut f: impl FnMut(&Tensor, &Tensor) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let Some(val) = &self.validation else {
            return Ok(());
        };
        let d = val.features();
        let mut chunk = |x: &[f32], y: LabelRows<'_>| -> Result<(), TrainError> {
            let (mut start, end) = (0, y.len());
            while start < end {
                let stop = (start + EVAL_CHUNK).min(end);
                let xb = Tensor::f_from_slice(&x[start * d..stop * d])?
                    .f_view([(stop - start) as i64, d as i64])?;
                let yb = labels_tensor(y.slice(start, stop))?;
                f(&to_device(xb, self.device)?, &to_device(yb, self.device)?)?;
                start = stop;
            }
            Ok(())
        };
        match val {
            Validation::Memory(v) => {
                let (start, end) = (range.start as usize, range.end as usize);
                chunk(&v.x[start * d..end * d], v.y.slice(start, end))
            }
            Validation::Stream { dir, manifest } => {
                // One shard in memory at a time, each verified as read.
                let reader = LocalDir(dir.clone());
                let mut first = 0u64;
                for (index, entry) in manifest.shards.iter().enumerate() {
                    let shard = first..first + entry.samples;
                    first = shard.end;
                    let (lo, hi) = (range.start.max(shard.start), range.end.min(shard.end));
                    if lo >= hi {
                        continue;
                    }
                    let s = read_shard(&reader, manifest, index)?;
                    let (a, b) = ((lo - shard.start) as usize, (hi - shard.start) as usize);
                    chunk(&s.x[a * d..b * d], s.y.slice(a, b))?;
                }
                Ok(())
            }
        }
    }
}

/// Copies a host batch to `device`: on a GPU from pinned memory without
/// blocking the host (the copy is ordered before the kernels that use it on
/// the same stream); on the CPU it already is where it belongs.
fn to_device(t: Tensor, device: Device) -> Result<Tensor, TrainError> {
    if device == Device::Cpu {
        return Ok(t);
    }
    let pinned = t.f_pin_memory(device)?;
    Ok(pinned.f_to_device_(device, pinned.kind(), true, false)?)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_dataset::{SynthOptions, synthesize};

    fn spec(data: &Path) -> JobSpec {
        let toml = format!(
            "name = \"prep\"\n[model]\nkind = \"mlp\"\nhidden = [4]\n[data]\ntrain = \"{}\"\n\
             [train]\nbatch_size = 8\nsteps = 2\nlearning_rate = 0.1\n[output]\ndir = \"{}\"\n",
            data.display(),
            data.parent().unwrap().join("out").display()
        );
        JobSpec::from_toml(&toml, &data.parent().unwrap().join("job.toml")).unwrap()
    }

    #[test]
    fn a_task_that_does_not_fit_the_labels_fails_the_load_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        ringmaster_dataset::synthesize_regression(&ringmaster_dataset::SynthRegression {
            output: data.clone(),
            name: "reg".into(),
            samples: 20,
            features: 3,
            targets: 2,
            seed: 1,
            shard_samples: 8,
        })
        .unwrap();
        // The default task is classification.
        let mut spec = spec(&data);
        let err = TrainData::load(&spec, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!(
                "task.kind = \"classification\" needs class labels (an i64 `y`), but the \
                 training set {} holds regression targets (2 per sample)",
                data.display()
            )),
            "{err}"
        );
        spec.task = TaskSpec::Regression {
            loss: ringmaster_common::jobspec::RegressionLoss::Mse,
        };
        let loaded = TrainData::load(&spec, Device::Cpu).unwrap();
        assert_eq!(loaded.labels, LabelKind::Targets(2));
        let (x, y) = loaded.batch(&[3, 0]).unwrap();
        assert_eq!((x.size(), y.size()), (vec![2, 3], vec![2, 2]));
        assert_eq!(y.kind(), tch::Kind::Float);
    }

    #[test]
    fn prepared_data_is_taken_once_and_only_while_its_manifest_is_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        synthesize(&SynthOptions {
            output: data.clone(),
            name: "prep".into(),
            samples: 40,
            features: 3,
            classes: 2,
            seed: 1,
            shard_samples: 16,
        })
        .unwrap();
        let spec = spec(&data);
        prepare(&spec, Device::Cpu);
        assert!(is_prepared(&spec, Device::Cpu));
        // Waits for the load in progress, then takes it.
        let taken = TrainData::prepared_or_load(&spec, Device::Cpu).unwrap();
        assert_eq!((taken.samples(), taken.features), (40, 3));
        assert!(!is_prepared(&spec, Device::Cpu), "taken once");

        // Prepared, then the dataset is rewritten: the next run loads the
        // new one, and the stale load is never handed out.
        prepare(&spec, Device::Cpu);
        let manifest = data.join(MANIFEST_FILE);
        let mut text = std::fs::read_to_string(&manifest).unwrap();
        text.push('\n');
        std::fs::write(&manifest, text).unwrap();
        assert!(!is_prepared(&spec, Device::Cpu));
        let fresh = TrainData::prepared_or_load(&spec, Device::Cpu).unwrap();
        assert_eq!(fresh.samples(), 40);
        // The stale load is dropped, not held beside the run's own data.
        let p = prepared();
        assert!(p.key.is_none() && p.data.is_none());
    }
}
