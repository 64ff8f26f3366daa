//! `model.kind = "torchscript"`: a module scripted or traced in PyTorch and saved with
//! `torch.jit.save`, trained here through libtorch with all its parameters.
//!
//! Its parameters are the module's own tensors (`named_parameters`, PyTorch's dotted names),
//! so the optimizer, the gradient buckets, checkpoints and `model.safetensors` work on them as on
//! a built-in model's, and the trained weights load back into the original module with
//! `load_state_dict`. What the module does is its own business; two things follow:
//! - randomness inside it (dropout) draws from libtorch's generator, which is seeded from the
//!   batch's samples before each training forward: a run is reproducible and resumes bitwise,
//!   but with dropout it depends on the number of workers (built-in models draw per sample);
//! - its buffers (BatchNorm's running statistics, registered masks) are listed through a small
//!   C++ shim (`worker/cpp/script_buffers.cpp`; tch's C API lists parameters only) as tensors on
//!   the module's own storage, so the run keeps them as a built-in model's: rank 0's after each
//!   step, in checkpoints, state transfers and `model.safetensors` (a strict `load_state_dict`
//!   then works), used by evaluation.

use super::{BuildError, torch_message};
use crate::sample_rng::SampleNoise;
use std::path::Path;
use std::sync::Mutex;
use tch::{CModule, Device, Kind, TchError, Tensor};

/// The line of a TorchScript interpreter error that says what went wrong (its last
/// `SomethingError: ...` line) rather than its first, which only says that something did.
pub(crate) fn script_message(e: &TchError) -> String {
    let text = match e {
        TchError::Torch(msg) => msg.as_str(),
        _ => return torch_message(e),
    };
    text.lines()
        .rev()
        .find_map(|l| {
            let (head, rest) = l.split_once(": ")?;
            (head.ends_with("Error") && !head.contains(' ')).then(|| rest.trim().to_string())
        })
        .unwrap_or_else(|| torch_message(e))
}

/// A loaded TorchScript module.
pub struct Script {
    /// `CModule` switches between training and evaluation through `&mut`; the model is shared
    /// (`&self`) during a step, hence the lock (never contended: one trainer thread).
    module: Mutex<Mode>,
    /// `[...]` each sample is viewed as; empty: `[features]`.
    input_shape: Vec<i64>,
}

struct Mode {
    module: CModule,
    training: bool,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("input_shape", &self.input_shape)
            .finish_non_exhaustive()
    }
}

impl Script {
    /// Loads the module on `device` and checks it against the dataset: `inputs` features per
    /// sample (reshaped to `input_shape` when given), one logit per class out.
    pub fn load(
        path: &Path,
        device: Device,
        inputs: i64,
        classes: i64,
        input_shape: Option<&[u32]>,
    ) -> Result<Script, BuildError> {
        let shape: Vec<i64> = input_shape
            .map(|s| s.iter().map(|&v| i64::from(v)).collect())
            .unwrap_or_default();
        if !shape.is_empty() && shape.iter().product::<i64>() != inputs {
            return Err(BuildError::Shape(format!(
                "model.input_shape {shape:?} holds {} values, the dataset has {inputs} features \
                 per sample",
                shape.iter().product::<i64>()
            )));
        }
        let module = CModule::load_on_device(path, device).map_err(|e| {
            BuildError::Shape(format!(
                "cannot load the TorchScript module {}: {}",
                path.display(),
                script_message(&e)
            ))
        })?;
        let script = Script {
            module: Mutex::new(Mode {
                module,
                training: true,
            }),
            input_shape: shape,
        };
        let params = script.named_parameters().map_err(|e| {
            BuildError::Shape(format!(
                "cannot list the parameters of {}: {}",
                path.display(),
                torch_message(&e)
            ))
        })?;
        if params.is_empty() {
            return Err(BuildError::Shape(format!(
                "the TorchScript module {} has no parameters to train",
                path.display()
            )));
        }
        if let Some((name, p)) = params
            .iter()
            .find(|(_, p)| p.kind() != Kind::Float || !p.requires_grad())
        {
            return Err(BuildError::Shape(format!(
                "parameter {name} of {} is {:?}{}; every parameter must be a trainable fp32 \
                 tensor",
                path.display(),
                p.kind(),
                if p.requires_grad() {
                    ""
                } else {
                    " without requires_grad"
                }
            )));
        }
        // A probe batch of two in evaluation mode, which changes no state: catches a module
        // that wants another input shape or returns the wrong width before any training.
        let probe = Tensor::f_zeros([2, inputs], (Kind::Float, device))
            .map_err(|e| BuildError::Shape(torch_message(&e)))?;
        let out = tch::no_grad(|| script.forward(&probe, false, None)).map_err(|e| {
            BuildError::Shape(format!(
                "the TorchScript module {} fails on a batch shaped {:?}: {}",
                path.display(),
                script.batch_shape(2, inputs),
                script_message(&e)
            ))
        })?;
        if out.size() != [2, classes] {
            return Err(BuildError::Shape(format!(
                "the TorchScript module {} maps a batch shaped {:?} to {:?}; the dataset needs \
                 {classes} outputs per sample (classes or targets), so it must return [2, {classes}]",
                path.display(),
                script.batch_shape(2, inputs),
                out.size()
            )));
        }
        Ok(script)
    }

    /// The module's buffers by name (dotted, as `state_dict` names them), in name order; the
    /// tensors share the module's storage, so writing them in place changes the module.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        let mode = super::super::collective::lock_ignoring_poison(&self.module);
        let mut named = ffi::named_buffers(&mode.module)?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }

    /// The module's parameters by name, in name order; the tensors are the module's own.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        let mode = super::super::collective::lock_ignoring_poison(&self.module);
        let mut named = mode.module.named_parameters()?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }

    fn batch_shape(&self, rows: i64, features: i64) -> Vec<i64> {
        if self.input_shape.is_empty() {
            return vec![rows, features];
        }
        std::iter::once(rows)
            .chain(self.input_shape.iter().copied())
            .collect()
    }

    /// Logits for a batch `[n, features]`, in training or evaluation mode; a training forward
    /// seeds libtorch's generator from the batch first.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        training: bool,
        noise: Option<&SampleNoise>,
    ) -> Result<Tensor, TchError> {
        let rows = xs.size().first().copied().unwrap_or(0);
        let features = xs.size().get(1).copied().unwrap_or(0);
        let x = xs.f_view(self.batch_shape(rows, features).as_slice())?;
        let mut mode = super::super::collective::lock_ignoring_poison(&self.module);
        if mode.training != training {
            if training {
                mode.module.f_set_train()?;
            } else {
                mode.module.f_set_eval()?;
            }
            mode.training = training;
        }
        if let Some(noise) = noise {
            tch::manual_seed(noise.batch_key() as i64);
        }
        mode.module.forward_ts(&[x])
    }
}

/// The shim of `worker/cpp/script_buffers.cpp`.
#[allow(unsafe_code)]
mod ffi {
    use std::ffi::{CStr, c_char, c_void};
    use tch::{CModule, TchError, Tensor};

    // tch keeps the `torch::jit::Module*` in a private field, `CModule`'s only one: its bytes
    // are that pointer. Checked here, so a tch whose `CModule` grows fails to build.
    const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());

    unsafe extern "C" {
        fn ringmaster_module_named_buffers(
            module: *mut c_void,
            data: *mut c_void,
            f: extern "C" fn(*mut c_void, *const c_char, *mut c_void),
        ) -> *mut c_char;
        fn free(p: *mut c_void);
    }

    extern "C" fn collect(data: *mut c_void, name: *const c_char, tensor: *mut c_void) {
        // SAFETY: `data` is the `Vec` passed below, alive for the call; `name` a C string and
        // `tensor` a new `at::Tensor*` the shim hands over, both valid for this callback.
        unsafe {
            let out = &mut *(data as *mut Vec<(String, Tensor)>);
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            out.push((name, Tensor::from_ptr(tensor as *mut torch_sys::C_tensor)));
        }
    }

    /// Every buffer of `module` (recursively), with a tensor handle on its storage.
    pub(super) fn named_buffers(module: &CModule) -> Result<Vec<(String, Tensor)>, TchError> {
        // SAFETY: see the size check above; the pointer stays owned by `module`.
        let raw = unsafe { *(module as *const CModule as *const *mut c_void) };
        let mut out: Vec<(String, Tensor)> = Vec::new();
        // SAFETY: a live module, a callback that only pushes to `out`.
        let err = unsafe {
            ringmaster_module_named_buffers(raw, &mut out as *mut _ as *mut c_void, collect)
        };
        if err.is_null() {
            return Ok(out);
        }
        // SAFETY: a C string from `strdup`, freed once here.
        let msg = unsafe {
            let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
            free(err as *mut c_void);
            msg
        };
        Err(TchError::Torch(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_errors_are_reported_by_their_cause() {
        let e = TchError::Torch(
            "The following operation failed in the TorchScript interpreter.\n\
             Traceback of TorchScript (most recent call last):\n  File \"x.py\", line 3\n\
             RuntimeError: Expected 3D (unbatched) or 4D (batched) input to conv2d, but got \
             input of size: [2, 64]\n"
                .into(),
        );
        assert_eq!(
            script_message(&e),
            "Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [2, 64]"
        );
        let plain = TchError::Torch("open file failed because of errno 2\nmore".into());
        assert_eq!(
            script_message(&plain),
            "open file failed because of errno 2"
        );
    }
}
