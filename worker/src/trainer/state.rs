//! A run's state on disk: checkpoint snapshots taken at a step boundary,
//! resuming from the newest committed checkpoint that verifies, and the final
//! `model.safetensors`.

use super::{Assignment, Event, TrainError};
use crate::checkpoint;
use crate::optim::Optimizer;
use std::path::Path;
use tch::{Device, Tensor};

/// Loads the newest candidate checkpoint that verifies, noting every one
/// skipped and why. No candidates means a fresh start.
pub(super) fn resume(
    a: &Assignment,
    names: &[String],
    params: &[Tensor],
    buffers: &[(String, Tensor)],
    optimizer: &mut Optimizer,
    device: Device,
    events: &mut dyn FnMut(Event),
) -> Result<Option<checkpoint::TrainState>, TrainError> {
    if a.resume_candidates.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    for dir in &a.resume_candidates {
        let loaded = match checkpoint::load(dir) {
            Ok(l) => l,
            Err(e) => {
                if a.rank == 0 {
                    events(Event::Note(format!(
                        "skipped checkpoint {}: {e}",
                        dir.display()
                    )));
                }
                skipped.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        let state = loaded.state;
        if state.global_batch != u64::from(a.spec.train.global_batch) {
            return Err(TrainError::Resume(format!(
                "{} was taken with batch_size {}, the job has {}",
                dir.display(),
                state.global_batch,
                a.spec.train.global_batch
            )));
        }
        let mut model = loaded.model;
        tch::no_grad(|| -> Result<(), TrainError> {
            let targets = names
                .iter()
                .zip(params)
                .chain(buffers.iter().map(|(n, b)| (n, b)));
            for (name, p) in targets {
                let t = model.remove(name).ok_or_else(|| {
                    TrainError::Resume(format!("{} has no tensor `{name}`", dir.display()))
                })?;
                if t.size() != p.size() {
                    return Err(TrainError::Resume(format!(
                        "`{name}` has shape {:?} in {}, the model has {:?}",
                        t.size(),
                        dir.display(),
                        p.size()
                    )));
                }
                p.shallow_clone().f_copy_(&t)?;
            }
            Ok(())
        })?;
        optimizer
            .load_state(names, loaded.optimizer, state.optimizer_steps, device)
            .map_err(TrainError::Resume)?;
        if a.rank == 0 {
            events(Event::Note(format!(
                "resumed from {} at step {}",
                dir.display(),
                state.step
            )));
        }
        return Ok(Some(state));
    }
    Err(TrainError::Resume(format!(
        "no candidate checkpoint verifies: {}",
        skipped.join("; ")
    )))
}

/// Writes `model.safetensors` (the parameters, then the buffers, in their own
/// types) under a temporary name, fsyncs, then renames, so a reader never
/// sees a half-written model.
pub(super) fn save_model(
    dir: &Path,
    named: &[(String, Tensor)],
    buffers: &[(String, Tensor)],
) -> Result<(), TrainError> {
    let path = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    let err = |p: &Path| {
        let p = p.display().to_string();
        move |source| TrainError::Output { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let cpu: Vec<(String, Tensor)> = named
        .iter()
        .chain(buffers)
        .map(|(k, t)| Ok((k.clone(), t.f_to_device(Device::Cpu)?)))
        .collect::<Result<_, tch::TchError>>()?;
    Tensor::write_safetensors(&cpu, &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))?;
    Ok(())
}
