//! Fallible tensor allocation with errors a user can read: a failed
//! allocation says what was being allocated, its shape, its size and the
//! device, followed by the first line of libtorch's message (never its C++
//! backtrace). [`torch_message`] condenses any libtorch error the same way.
//!
//! This is where libtorch errors become one line; deciding what to do about
//! them (fail the job, report it) is the trainer's business.

use tch::{Device, Kind, TchError, Tensor};

/// Longest libtorch message kept: CUDA's out-of-memory text runs to several
/// hundred characters of tuning advice after the part that matters.
const MAX_MESSAGE_CHARS: usize = 200;

/// An allocation libtorch refused (or failed to initialise).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot allocate {what} {shape:?} ({size}) on {device}: {cause}",
    size = describe_bytes(bytes_of(shape, *kind)),
    device = device_name(*device)
)]
pub struct AllocError {
    /// What the memory was for, e.g. `model parameter fc0.weight`.
    pub what: String,
    pub shape: Vec<i64>,
    pub kind: Kind,
    pub device: Device,
    /// libtorch's message, condensed to one line.
    pub cause: String,
}

impl AllocError {
    /// Bytes the allocation asked for; u128 because a shape that fails is
    /// often one whose size does not fit in 64 bits.
    pub fn bytes(&self) -> u128 {
        bytes_of(&self.shape, self.kind)
    }
}

fn bytes_of(shape: &[i64], kind: Kind) -> u128 {
    let elements = shape
        .iter()
        .fold(1u128, |acc, &d| acc.saturating_mul(d.max(0) as u128));
    elements.saturating_mul(kind.elt_size_in_bytes() as u128)
}

/// Runs `make`, which allocates a tensor of `shape` and `kind` on `device`,
/// turning its failure into an [`AllocError`] about `what`.
pub fn allocate<T>(
    what: &str,
    shape: &[i64],
    kind: Kind,
    device: Device,
    make: impl FnOnce() -> Result<T, TchError>,
) -> Result<T, AllocError> {
    make().map_err(|e| AllocError {
        what: what.to_string(),
        shape: shape.to_vec(),
        kind,
        device,
        cause: torch_message(&e),
    })
}

/// A zero-filled tensor, or an [`AllocError`] about `what`.
pub fn zeros(what: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, AllocError> {
    allocate(what, shape, kind, device, || {
        Tensor::f_zeros(shape, (kind, device))
    })
}

/// A copy of a host slice on `device`, or an [`AllocError`] about `what`.
pub fn from_host<T: tch::kind::Element>(
    what: &str,
    data: &[T],
    shape: &[i64],
    device: Device,
) -> Result<Tensor, AllocError> {
    allocate(what, shape, T::KIND, device, || {
        Tensor::f_from_slice(data)?.f_view(shape)?.f_to(device)
    })
}

/// The first meaningful line of a libtorch error: C++ exceptions carry an
/// `Exception raised from ...` line and a `frame #N` backtrace of thousands
/// of characters, which say nothing to a user and bury the cause.
pub fn torch_message(e: &TchError) -> String {
    let text = match e {
        // The variant's Display adds "Internal torch error: "; callers say
        // "libtorch" themselves.
        TchError::Torch(msg) => msg.clone(),
        other => other.to_string(),
    };
    condense(&text)
}

fn condense(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .find(|l| !l.is_empty())
        .unwrap_or("unknown libtorch error");
    if line.chars().count() <= MAX_MESSAGE_CHARS {
        return line.to_string();
    }
    let cut: String = line.chars().take(MAX_MESSAGE_CHARS).collect();
    // End at a sentence when one ends in the kept part, else mark the cut.
    match cut.rfind(". ") {
        Some(end) if end > MAX_MESSAGE_CHARS / 2 => cut[..=end].to_string(),
        _ => format!("{}…", cut.trim_end()),
    }
}

/// `cpu`, `cuda:0`: the spelling of `--device`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// Exact bytes with a binary-unit figure, e.g. `238.4 GiB, 256000000000 bytes`.
fn describe_bytes(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.1} {unit}, {bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &str, expected: &str) {
        assert_eq!(torch_message(&TchError::Torch(raw.into())), expected);
    }

    #[test]
    fn libtorch_messages_lose_their_backtrace() {
        check(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes. \
             Error code 12 (Cannot allocate memory)\nException raised from allocate_impl at \
             ../c10/core/impl/alloc_cpu.cpp:117 (most recent call first):\nframe #0: \
             c10::Error::Error() + 0x1\nframe #1: at::empty()",
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes. \
             Error code 12 (Cannot allocate memory)",
        );
        check("\n  shape mismatch  \nframe #0: x", "shape mismatch");
        check(
            "Exception raised from f at g.cpp:1\nframe #0: h",
            "unknown libtorch error",
        );
    }

    #[test]
    fn long_messages_end_at_a_sentence_or_are_marked_cut() {
        let cuda = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of \
                    79.10 GiB of which 3.56 GiB is free. Of the allocated memory 70.00 GiB is \
                    allocated by PyTorch, and 1.00 GiB is reserved by PyTorch but unallocated. If \
                    reserved but unallocated memory is large try setting \
                    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.";
        let got = torch_message(&TchError::Torch(cuda.into()));
        assert!(got.starts_with("CUDA out of memory. Tried to allocate 20.00 GiB."));
        assert!(got.ends_with('.') && got.chars().count() <= MAX_MESSAGE_CHARS);
        let word = "x".repeat(500);
        let got = torch_message(&TchError::Torch(word));
        assert_eq!(got.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(got.ends_with('…'));
    }

    #[test]
    fn an_alloc_error_reads_as_one_line_with_its_size() {
        let e = AllocError {
            what: "model parameter fc0.weight".into(),
            shape: vec![1_000_000_000, 64],
            kind: Kind::Float,
            device: Device::Cuda(1),
            cause: "out of memory".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot allocate model parameter fc0.weight [1000000000, 64] \
             (238.4 GiB, 256000000000 bytes) on cuda:1: out of memory"
        );
        let tiny = AllocError {
            shape: vec![3],
            device: Device::Cpu,
            ..e
        };
        assert!(tiny.to_string().contains("[3] (12 bytes) on cpu"), "{tiny}");
    }
}
