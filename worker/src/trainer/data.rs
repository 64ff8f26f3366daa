//! Where a run's samples come from: the training set (held on the model's
//! device and gathered by dataset sample id) and the validation set (copied
//! to the device a chunk at a time when evaluated). The run asks for samples
//! by id and never touches the arrays, so a streamed source can replace this
//! one without changing the step.
//!
//! A free worker may load a running job's data ahead of time ([`prepare`],
//! on the coordinator's `PrepareJob`): a spare that later replaces a lost
//! member then joins without reading and verifying the dataset, which is
//! most of what a newcomer costs a recovery. The prepared data is taken by
//! the next run whose datasets, device and manifests are the same.

use super::TrainError;
use crate::model;
use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::{Dataset, MANIFEST_FILE};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex};
use tch::{Device, Tensor};

/// Evaluation runs in chunks of this many samples to bound memory.
const EVAL_CHUNK: usize = 4096;

/// The training and validation data of one run.
pub(super) struct TrainData {
    xs: Tensor,
    ys: Tensor,
    samples: u64,
    /// Features per sample.
    pub features: usize,
    /// Number of classes of the labels.
    pub classes: u32,
    validation: Option<Dataset>,
    device: Device,
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

    /// Loads (and verifies) the job's datasets and puts the training set on
    /// `device`.
    pub fn load(spec: &JobSpec, device: Device) -> Result<Self, TrainError> {
        let train = Dataset::load(&spec.data.train)?;
        let validation = match &spec.data.validation {
            Some(dir) => Some(Dataset::load(dir)?),
            None => None,
        };
        if let Some(v) = &validation
            && v.features != train.features
        {
            return Err(TrainError::Invalid(format!(
                "validation set has {} features, training set {}",
                v.features, train.features
            )));
        }
        let n = train.y.len() as i64;
        let features = train.features;
        let xs = model::from_host("training inputs", &train.x, &[n, features as i64], device)?;
        let ys = model::from_host("training labels", &train.y, &[n], device)?;
        Ok(TrainData {
            xs,
            ys,
            samples: n as u64,
            features,
            classes: train.manifest.schema.num_classes,
            validation,
            device,
        })
    }

    /// Number of training samples.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Inputs and labels of the training samples `ids`, in that order.
    pub fn batch(&self, ids: &[u64]) -> Result<(Tensor, Tensor), TrainError> {
        let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let idx = Tensor::f_from_slice(&idx)?.f_to_device(self.device)?;
        Ok((
            self.xs.f_index_select(0, &idx)?,
            self.ys.f_index_select(0, &idx)?,
        ))
    }

    /// Size of the validation set, if there is one.
    pub fn validation_samples(&self) -> Option<u64> {
        self.validation.as_ref().map(|v| v.y.len() as u64)
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
        let d = val.features;
        let (mut start, end) = (range.start as usize, range.end as usize);
        while start < end {
            let stop = (start + EVAL_CHUNK).min(end);
            let xb = Tensor::f_from_slice(&val.x[start * d..stop * d])?
                .f_view([(stop - start) as i64, d as i64])?
                .f_to_device(self.device)?;
            let yb = Tensor::f_from_slice(&val.y[start..stop])?.f_to_device(self.device)?;
            f(&xb, &yb)?;
            start = stop;
        }
        Ok(())
    }
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
