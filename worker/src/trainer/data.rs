//! Where a run's samples come from: the training set (held on the model's
//! device and gathered by dataset sample id) and the validation set (copied
//! to the device a chunk at a time when evaluated). The run asks for samples
//! by id and never touches the arrays, so a streamed source can replace this
//! one without changing the step.

use super::TrainError;
use crate::model;
use ringmaster_common::jobspec::JobSpec;
use ringmaster_dataset::Dataset;
use std::ops::Range;
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

impl TrainData {
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
