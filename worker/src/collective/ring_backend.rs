//! The ring as a tensor-level [`Collective`]: CPU tensors are reduced in place in their own
//! memory; tensors on a device travel through one host staging buffer that this backend owns
//! (pinned when the device is CUDA, so the copies can use DMA), with one bulk copy to the host
//! and one back per operation, never one per parameter.

use super::ring::{RingCollective, RingConfig};
use super::{AbortHandle, Collective, CollectiveError, DataPlaneListener};
use tch::{Device, Kind, Tensor};

/// A [`RingCollective`] with the staging it needs to reduce tensors on any device.
#[derive(Debug)]
pub struct RingBackend {
    ring: RingCollective,
    /// Host memory for device tensors, grown to the largest bucket seen; never used for CPU
    /// tensors, which the ring reduces where they are.
    staging: Option<Tensor>,
}

impl RingBackend {
    /// Joins the ring of one generation (see [`RingCollective::connect`]).
    pub fn connect(
        listener: &DataPlaneListener,
        cfg: RingConfig,
    ) -> Result<RingBackend, CollectiveError> {
        Ok(RingBackend::new(RingCollective::connect(listener, cfg)?))
    }

    /// Wraps a connected ring.
    pub fn new(ring: RingCollective) -> RingBackend {
        RingBackend {
            ring,
            staging: None,
        }
    }

    /// Runs `op` on the memory of `flat`: directly for a CPU tensor, else through the staging
    /// buffer (copied in unless `copy_in` is false, always copied back).
    fn on_host(
        &mut self,
        flat: &mut Tensor,
        copy_in: bool,
        op: impl FnOnce(&mut RingCollective, &mut [f32]) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        check_flat(flat)?;
        let len = flat.numel();
        if flat.device() == Device::Cpu {
            return op(&mut self.ring, host_slice(flat, len)?);
        }
        let mut staging = self.staging_for(len, flat.device())?;
        if copy_in {
            staging
                .f_copy_(flat)
                .map_err(device_error("staging copy"))?;
        }
        op(&mut self.ring, host_slice(&mut staging, len)?)?;
        flat.f_copy_(&staging)
            .map_err(device_error("copy from staging"))
    }

    /// A view of `len` elements of the staging buffer, growing it first when needed.
    fn staging_for(&mut self, len: usize, device: Device) -> Result<Tensor, CollectiveError> {
        let have = self.staging.as_ref().map_or(0, |t| t.numel());
        if have < len {
            // Freed before the new one is allocated: two large buffers need not fit at once.
            self.staging = None;
            let host = Tensor::f_empty([len as i64], (Kind::Float, Device::Cpu))
                .map_err(device_error("allocating the staging buffer"))?;
            let host = match device {
                Device::Cuda(_) => host
                    .f_pin_memory(device)
                    .map_err(device_error("pinning the staging buffer"))?,
                _ => host,
            };
            self.staging = Some(host);
        }
        let staging = self.staging.as_ref().expect("allocated above");
        staging
            .f_narrow(0, 0, len as i64)
            .map_err(device_error("staging view"))
    }
}

impl Collective for RingBackend {
    fn rank(&self) -> u32 {
        self.ring.rank()
    }

    fn world_size(&self) -> u32 {
        self.ring.world_size()
    }

    fn generation(&self) -> u64 {
        self.ring.generation()
    }

    fn all_reduce_sum(&mut self, flat: &mut Tensor) -> Result<(), CollectiveError> {
        self.on_host(flat, true, |ring, buf| ring.all_reduce_sum(buf))
    }

    fn broadcast(&mut self, flat: &mut Tensor, root: u32) -> Result<(), CollectiveError> {
        let is_root = root == self.ring.rank();
        // Only the root's values matter: the others need not copy theirs in.
        self.on_host(flat, is_root, |ring, buf| ring.broadcast(buf, root))
    }

    fn broadcast_bytes(
        &mut self,
        bytes: &mut Vec<u8>,
        root: u32,
        max_len: usize,
    ) -> Result<(), CollectiveError> {
        // The ring moves fp32 words and a broadcast only copies them, so bytes travel bit-exact
        // packed four to a word: first the length (as two 32-bit halves), then the words.
        let is_root = root == self.ring.rank();
        let len = bytes.len() as u64;
        let mut header = [
            f32::from_bits(len as u32),
            f32::from_bits((len >> 32) as u32),
        ];
        self.ring.broadcast(&mut header, root)?;
        let len = u64::from(header[0].to_bits()) | (u64::from(header[1].to_bits()) << 32);
        if len > max_len as u64 {
            return Err(CollectiveError::Protocol {
                rank: root,
                detail: format!("announced a {len}-byte message, more than the {max_len} allowed"),
            });
        }
        let len = len as usize;
        let mut words = vec![0f32; len.div_ceil(4)];
        if is_root {
            bytemuck::cast_slice_mut::<f32, u8>(&mut words)[..len].copy_from_slice(bytes);
        }
        self.ring.broadcast(&mut words, root)?;
        if !is_root {
            bytes.clear();
            bytes.extend_from_slice(&bytemuck::cast_slice::<f32, u8>(&words)[..len]);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.ring.barrier()
    }

    fn abort_handle(&self) -> AbortHandle {
        self.ring.abort_handle()
    }
}

/// Refuses what the ring cannot reduce in place: anything but a contiguous fp32 vector.
fn check_flat(t: &Tensor) -> Result<(), CollectiveError> {
    if t.kind() != Kind::Float || t.dim() != 1 || !t.is_contiguous() {
        return Err(CollectiveError::InvalidArgument(format!(
            "collectives take contiguous 1-D fp32 tensors, got {:?} of shape {:?}",
            t.kind(),
            t.size()
        )));
    }
    Ok(())
}

/// The memory of a contiguous fp32 CPU tensor as a slice.
#[allow(unsafe_code)]
fn host_slice(t: &mut Tensor, len: usize) -> Result<&mut [f32], CollectiveError> {
    check_flat(t)?;
    if t.device() != Device::Cpu || t.numel() < len {
        return Err(CollectiveError::InvalidArgument(format!(
            "host view of {len} elements over a {:?} tensor of {}",
            t.device(),
            t.numel()
        )));
    }
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: `t` is a contiguous fp32 CPU tensor of at least `len` elements (checked above), so
    // its data pointer addresses `len` initialised, aligned f32s. The slice borrows `t` mutably,
    // which keeps this handle from being used while the slice lives; libtorch handles sharing its
    // storage are the caller's (the trainer's gradient views), which it does not touch while a
    // collective runs.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, len) })
}

fn device_error(what: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
    move |e| CollectiveError::Device(format!("{what}: {}", crate::model::torch_message(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solo() -> RingBackend {
        let listener = DataPlaneListener::bind("127.0.0.1:0").unwrap();
        let cfg = RingConfig::new("solo", 1, 0, vec!["unused".into()]);
        RingBackend::connect(&listener, cfg).unwrap()
    }

    #[test]
    fn tensors_that_are_not_flat_fp32_are_refused_with_what_they_are() {
        let mut c = solo();
        let mut t = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        let e = c.all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(e.contains("shape [2, 2]"), "{e}");
        let mut t = Tensor::zeros([4], (Kind::Double, Device::Cpu));
        let e = c.all_reduce_sum(&mut t).unwrap_err().to_string();
        assert!(e.contains("Double"), "{e}");
    }

    #[test]
    fn a_solo_reduction_leaves_the_tensor_as_it_was() {
        let mut c = solo();
        let mut t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
        c.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, -2.0, 3.25]);
        c.broadcast(&mut t, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, -2.0, 3.25]);
    }
}
