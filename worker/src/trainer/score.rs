//! Scoring a trained model outside a job (`worker evaluate`, which `coordinator evaluate`
//! runs): the job's spec (`job.json`, written next to its outputs) rebuilds the model, the
//! weights come from `model.safetensors` (an output folder or a checkpoint), and any dataset
//! of the right kind is scored a shard at a time with the same losses and scores as a job's
//! own evaluation, on one process (nothing to reduce).

use super::TrainError;
use super::data::{check_image_shape, labels_tensor};
use super::evaluation::{Counts, Evaluation, LmScores, RegressionScores, RegressionSums, Scores};
use super::loss::Loss;
use super::precision::Precision;
use crate::model;
use ringmaster_common::jobspec::{JobSpec, TaskSpec};
use ringmaster_dataset::{DatasetManifest, LabelKind, LocalDir, read_shard};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The file a job's spec is kept in, next to its outputs and its checkpoints.
pub const SPEC_FILE: &str = "job.json";

/// Samples per forward pass.
const CHUNK: usize = 4096;

/// Writes the job's spec as `job.json` into its output folder and its checkpoint folder
/// (rank 0, at the start of each generation it leads), so a trained model or any checkpoint
/// can be scored later without the job file. Written under a temporary name and renamed.
pub fn write_spec(spec: &JobSpec, dirs: &[PathBuf]) -> Result<(), TrainError> {
    let bytes = serde_json::to_vec_pretty(spec)
        .map_err(|e| TrainError::Invalid(format!("job spec as JSON: {e}")))?;
    for dir in dirs {
        let path = dir.join(SPEC_FILE);
        let tmp = dir.join(format!(".{SPEC_FILE}.tmp"));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| TrainError::Output {
                path: path.display().to_string(),
                source,
            })?;
    }
    Ok(())
}

/// The spec of the model in `dir`: `dir/job.json`, or its parent's (a checkpoint's `step-N`
/// folder sits in the job's checkpoint folder).
pub fn find_spec(dir: &Path) -> Result<(JobSpec, PathBuf), TrainError> {
    let candidates = [
        Some(dir.join(SPEC_FILE)),
        dir.parent().map(|p| p.join(SPEC_FILE)),
    ];
    let Some(path) = candidates.into_iter().flatten().find(|p| p.is_file()) else {
        return Err(TrainError::Invalid(format!(
            "no {SPEC_FILE} in {} or its parent: give a job's output folder \
             (<output.dir>/<job-id>) or one of its checkpoints (<checkpoint.dir>/<job-id>/step-N)",
            dir.display()
        )));
    };
    let bytes = std::fs::read(&path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    let spec: JobSpec = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    spec.check()
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    Ok((spec, path))
}

/// Scores the model in `model_dir` (trained by the job `spec` describes) on the dataset in
/// `data_dir`.
pub fn score(
    spec: &JobSpec,
    model_dir: &Path,
    data_dir: &Path,
    device: Device,
) -> Result<Evaluation, TrainError> {
    let manifest = DatasetManifest::read(data_dir)?;
    let labels = manifest.labels();
    let fits = matches!(
        (&spec.task, labels),
        (TaskSpec::Classification { .. }, LabelKind::Classes(_))
            | (TaskSpec::Regression { .. }, LabelKind::Targets(_))
            | (TaskSpec::LanguageModel, LabelKind::Tokens { .. })
    );
    if !fits {
        return Err(TrainError::Invalid(format!(
            "{} holds {labels}, which a model trained for task.kind = \"{}\" cannot score",
            data_dir.display(),
            spec.task.kind()
        )));
    }
    check_image_shape(spec, &manifest, data_dir)?;
    // Images are normalized as their own manifest says: a set packed on its own has its own
    // statistics, and the model would see its pixels shifted. The job's training set, when it
    // is still there, says what the model was trained on.
    if let Ok(train) = DatasetManifest::read(&spec.data.train)
        && train.image_normalization != manifest.image_normalization
    {
        return Err(TrainError::Invalid(format!(
            "{} is normalized with other statistics than the training set {} ({:?} vs {:?}): \
             pack it with --normalization-from {}",
            data_dir.display(),
            spec.data.train.display(),
            manifest.image_normalization,
            train.image_normalization,
            spec.data.train.display()
        )));
    }
    let weights_path = model_dir.join("model.safetensors");
    let weights: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&weights_path)
            .map_err(|e| {
                TrainError::Invalid(format!(
                    "{}: {}",
                    weights_path.display(),
                    model::torch_message(&e)
                ))
            })?
            .into_iter()
            .collect();
    let d = manifest.features();
    let (vars, net) = model::initial(
        spec.seed,
        d as i64,
        labels.outputs() as i64,
        &spec.model,
        device,
    )
    .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut named = net.named_parameters(&vars)?;
    named.extend(net.named_buffers()?);
    // Every parameter and buffer, by name and shape: weights of another model are refused, not
    // half loaded.
    for (name, p) in &named {
        let Some(w) = weights.get(name) else {
            return Err(TrainError::Invalid(format!(
                "{} has no tensor {name}: it is not a model of this job's architecture (for \
                 this dataset's {d} features and {} outputs)",
                weights_path.display(),
                labels.outputs()
            )));
        };
        if w.size() != p.size() {
            return Err(TrainError::Invalid(format!(
                "{name} in {} is {:?}, the model needs {:?} (for this dataset's {d} features \
                 and {} outputs)",
                weights_path.display(),
                w.size(),
                p.size(),
                labels.outputs()
            )));
        }
        tch::no_grad(|| p.shallow_clone().f_copy_(w))?;
    }
    if weights.len() != named.len() {
        let extra: Vec<&String> = weights
            .keys()
            .filter(|k| !named.iter().any(|(n, _)| n == *k))
            .collect();
        return Err(TrainError::Invalid(format!(
            "{} holds tensors this job's model does not have: {extra:?}",
            weights_path.display()
        )));
    }
    let precision = Precision::new(spec.train.precision, device).map_err(TrainError::Invalid)?;
    let loss = Loss::of(&spec.task);
    let n = manifest.num_samples;
    let reader = LocalDir(data_dir.to_path_buf());
    // Every chunk of every shard, one shard in memory at a time, each verified as read.
    let for_chunks = |f: &mut dyn FnMut(&Tensor, &Tensor) -> Result<(), TrainError>| {
        for index in 0..manifest.shards.len() {
            let s = read_shard(&reader, &manifest, index)?;
            let mut start = 0;
            while start < s.len() {
                let stop = (start + CHUNK).min(s.len());
                let xb = Tensor::f_from_slice(&s.x[start * d..stop * d])?
                    .f_view([(stop - start) as i64, d as i64])?
                    .f_to_device(device)?;
                let yb = labels_tensor(s.y.slice(start, stop))?.f_to_device(device)?;
                f(&xb, &yb)?;
                start = stop;
            }
        }
        Ok::<(), TrainError>(())
    };
    let host = |t: Tensor| -> Result<Vec<f32>, TrainError> {
        let t = t.f_to_device(Device::Cpu)?;
        let len = t.size()[0] as usize;
        let mut out = vec![0f32; len];
        t.f_copy_data(&mut out, len)?;
        Ok(out)
    };
    tch::no_grad(|| match labels {
        LabelKind::Classes(classes) => {
            let mut counts = Counts::new(classes, device)?;
            for_chunks(&mut |xb, yb| {
                let logits = precision.forward(|| net.forward_eval(xb))?;
                counts.loss_sum += loss.sum(&logits, yb)?.f_double_value(&[])?;
                counts.add(&logits, yb)
            })?;
            let out = host(counts.to_reduce()?)?;
            Ok(Evaluation::Classification(Scores::from_reduced(
                &out, classes, n, 0,
            )))
        }
        LabelKind::Targets(k) => {
            let mut sums = RegressionSums::new(k);
            for_chunks(&mut |xb, yb| {
                let pred = precision.forward(|| net.forward_eval(xb))?;
                sums.loss_sum += loss.sum(&pred, yb)?.f_double_value(&[])?;
                sums.add(&pred, yb)
            })?;
            let first = host(sums.to_reduce()?)?;
            let between = host(sums.between(&first, n)?)?;
            Ok(Evaluation::Regression(RegressionScores::from_reduced(
                &first, &between, k, n, 0,
            )))
        }
        LabelKind::Tokens { len, .. } => {
            let mut loss_sum = 0.0;
            for_chunks(&mut |xb, yb| {
                let logits = precision.forward(|| net.forward_eval(xb))?;
                loss_sum += loss.sum(&logits, yb)?.f_double_value(&[])?;
                Ok(())
            })?;
            Ok(Evaluation::LanguageModel(LmScores::from_loss_sum(
                loss_sum, n, len, 0,
            )))
        }
    })
}
