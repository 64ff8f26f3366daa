//! What the cluster knows of a worker besides its id: the device it trains
//! on ([`Device`], parsed once from the label the worker registers with) and
//! whether it is running a job ([`WorkerState`]). The device *kind* a job asks
//! for is [`DeviceKind`] in `jobspec`; how these travel on the wire is
//! `ringmaster-proto`'s business.

use crate::jobspec::DeviceKind;
use std::fmt;
use std::str::FromStr;

/// The device a worker trains on, as it registered: `cpu`, `cuda` (the
/// default GPU) or `cuda:N`. Displays as it was written, so `coordinator
/// workers` shows what the user passed to `worker --device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A GPU; `None` is plain `cuda` (the default device).
    Cuda(Option<u32>),
}

/// Why a device label is not one a worker can register with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`, expected `cpu` or `cuda:N`")]
pub struct DeviceError(pub String);

impl Device {
    /// What jobs ask for: the scheduler places a job only on workers of its
    /// kind.
    pub fn kind(self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
        }
    }
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(Device::Cuda(Some(n))),
                _ => Err(DeviceError(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether a registered worker runs a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Free: the scheduler may place a job on it.
    Idle,
    /// Holds a rank of a job's current generation (or of an ended one whose
    /// end it has not reported yet).
    Busy,
}

impl WorkerState {
    /// The lowercase name the CLI shows.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(label: &str, expected: Result<Device, ()>) {
        let parsed = label.parse::<Device>();
        assert_eq!(parsed.clone().map_err(|_| ()), expected, "{label}");
        match parsed {
            Ok(d) => assert_eq!(d.to_string(), label),
            Err(e) => assert_eq!(
                e.to_string(),
                format!("unknown device `{label}`, expected `cpu` or `cuda:N`")
            ),
        }
    }

    #[test]
    fn device_labels_parse_once_and_display_as_written() {
        check("cpu", Ok(Device::Cpu));
        check("cuda", Ok(Device::Cuda(None)));
        check("cuda:0", Ok(Device::Cuda(Some(0))));
        check("cuda:7", Ok(Device::Cuda(Some(7))));
        for bad in [
            "", "CPU", "gpu", "cuda:", "cuda:-1", "cuda:x", "cudax", "cuda0",
        ] {
            check(bad, Err(()));
        }
        assert_eq!(Device::Cuda(Some(3)).kind(), DeviceKind::Cuda);
        assert_eq!(Device::Cpu.kind(), DeviceKind::Cpu);
    }
}
