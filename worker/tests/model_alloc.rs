//! A model too large for the machine: building it must fail with one
//! readable line (what, how many bytes, which device, libtorch's reason), not
//! a panic carrying a C++ backtrace; other libtorch errors keep only their
//! first line too.
//!
//! Its own test binary because the failed build still draws from libtorch's
//! global RNG, which the seeded tests in `model.rs` must have to themselves.

use ringmaster_common::jobspec::Activation;
use ringmaster_worker::model::Mlp;
use ringmaster_worker::trainer::TrainError;
use tch::{Device, nn};

#[test]
fn a_model_larger_than_memory_fails_with_one_line_naming_the_parameter() {
    // The constructor is called directly, past the job checks on layer
    // widths: fc0.weight is [16, 8e9] f32, 512 GB, which Linux refuses at
    // once on any machine this runs on (no page is touched).
    let vs = nn::VarStore::new(Device::Cpu);
    let err = Mlp::new(&vs.root(), 8_000_000_000, 10, &[16], Activation::Relu, 0.0).unwrap_err();
    let line = err.to_string();
    eprintln!("{line}");
    assert!(
        line.starts_with(
            "cannot allocate model parameter fc0.weight [16, 8000000000] \
             (476.8 GiB, 512000000000 bytes) on cpu: "
        ),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");
    assert!(line.len() < 300, "{} characters: {line}", line.len());
    assert!(!line.contains("frame #") && !line.contains("Exception raised"));
    // libtorch's own reason follows.
    assert!(line.len() > 100, "{line}");
    assert_eq!(err.bytes(), 512_000_000_000);

    // It reaches the coordinator unchanged as the trainer's failure reason.
    assert_eq!(TrainError::from(err).to_string(), line);
}

#[test]
fn any_libtorch_error_reads_as_its_first_line() {
    let raw = "The size of tensor a (3) must match the size of tensor b (4) at non-singleton \
               dimension 1\nException raised from infer_size_impl at \
               ../aten/src/ATen/ExpandUtils.cpp:31 (most recent call first):\nframe #0: \
               c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f in libc10.so)\n\
               frame #1: at::infer_size_dimvector() + 0x1";
    let e = TrainError::from(tch::TchError::Torch(raw.into()));
    assert_eq!(
        e.to_string(),
        "libtorch: The size of tensor a (3) must match the size of tensor b (4) at \
         non-singleton dimension 1"
    );
}
