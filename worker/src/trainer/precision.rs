//! Mixed precision (`train.precision = "bf16"`): the forward pass runs under CUDA autocast in
//! bfloat16 while parameters, gradients, optimizer state and checkpoints stay fp32, as with
//! `torch.autocast("cuda", dtype=torch.bfloat16)` in PyTorch.
//!
//! tch turns autocast on and off but cannot choose its type, and CUDA autocast defaults to
//! fp16, so the type is set through libtorch's own `at::autocast::set_autocast_dtype` (a C++
//! function, reached by its mangled name; it is thread-local, so it is set on every use). The
//! outputs come back as fp32, so losses and scores are computed in fp32 as autocast's own
//! fp32 list would.

use ringmaster_common::jobspec::FloatFormat;
use tch::{Device, Kind, TchError, Tensor};

/// c10::DeviceType::CUDA.
const DEVICE_CUDA: i8 = 1;
/// c10::ScalarType::BFloat16.
const SCALAR_BF16: i8 = 15;

#[allow(unsafe_code)]
mod ffi {
    // Both take and return `enum class ... : int8_t`, passed as a plain 8-bit integer.
    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
    }
}

/// The autocast type of CUDA on this thread, as a c10 scalar type code.
#[allow(unsafe_code)]
fn cuda_autocast_dtype() -> i8 {
    // SAFETY: a plain getter of a thread-local with a valid device type.
    unsafe { ffi::get_autocast_dtype(DEVICE_CUDA) }
}

#[allow(unsafe_code)]
fn set_cuda_autocast_bf16() {
    // SAFETY: a plain setter of a thread-local with valid enum values.
    unsafe { ffi::set_autocast_dtype(DEVICE_CUDA, SCALAR_BF16) }
}

/// How a run's forward passes are computed.
#[derive(Debug, Clone, Copy)]
pub struct Precision {
    bf16: bool,
}

impl Precision {
    /// The precision of `format` on `device`; bf16 needs CUDA (the job spec refuses it
    /// elsewhere, so this is only reached by a spec that bypassed its checks).
    pub fn new(format: FloatFormat, device: Device) -> Result<Precision, String> {
        match (format, device) {
            (FloatFormat::Fp32, _) => Ok(Precision { bf16: false }),
            (FloatFormat::Bf16, Device::Cuda(_)) => {
                // Checked once here so that a libtorch whose autocast ignores the setting
                // fails the job at start instead of training silently in fp16.
                set_cuda_autocast_bf16();
                match cuda_autocast_dtype() {
                    SCALAR_BF16 => Ok(Precision { bf16: true }),
                    other => Err(format!(
                        "libtorch did not take bf16 as CUDA's autocast type (it reads back as \
                         scalar type {other})"
                    )),
                }
            }
            (FloatFormat::Bf16, d) => Err(format!(
                "train.precision = \"bf16\" needs a CUDA device; this worker trains on {d:?}"
            )),
        }
    }

    /// Runs `forward` in this precision; the result is fp32.
    pub fn forward(
        &self,
        forward: impl FnOnce() -> Result<Tensor, TchError>,
    ) -> Result<Tensor, TchError> {
        if !self.bf16 {
            return forward();
        }
        set_cuda_autocast_bf16();
        tch::autocast(true, forward)?.f_to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_autocast_type_is_set_through_libtorch() {
        // Runs on CPU too: the setting is a thread-local of libtorch, not a device call. CUDA's
        // default is fp16 (c10 code 5); after setting it reads back as bf16.
        std::thread::spawn(|| {
            assert_eq!(cuda_autocast_dtype(), 5);
            set_cuda_autocast_bf16();
            assert_eq!(cuda_autocast_dtype(), SCALAR_BF16);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn bf16_needs_cuda_and_fp32_is_untouched() {
        let err = Precision::new(FloatFormat::Bf16, Device::Cpu).unwrap_err();
        assert!(err.contains("needs a CUDA device"), "{err}");
        let p = Precision::new(FloatFormat::Fp32, Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[1.5f32, 2.0]);
        let y = p.forward(|| x.f_mul_scalar(2.0)).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![3.0, 4.0]);
    }
}
