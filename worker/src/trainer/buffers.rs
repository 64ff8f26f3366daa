//! A model's buffers (BatchNorm's running statistics and batch count) between ranks.
//!
//! Buffers are small (two floats per normalized channel and one count per layer) and typed
//! (the count is i64, as PyTorch's `num_batches_tracked`; a TorchScript module may register
//! bool masks), so they travel as bincode [`BufferImage`]s through `broadcast_bytes` rather
//! than in the fp32 buckets that carry gradients and parameters: an image is exact in any
//! element type, and names, types and shapes are checked on arrival.
//!
//! Each rank's batch normalization updates its buffers from its own slice of the batch; as
//! PyTorch DDP broadcasts rank 0's buffers before every forward, [`sync`] makes every rank's
//! buffers rank 0's after every step. The running statistics are therefore those of rank 0's
//! slices, and at every step boundary all ranks hold one state, which checkpoints, state
//! transfers and evaluation rely on.

use super::TrainError;
use crate::collective::Collective;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Largest image accepted from rank 0 (buffers of any sensible model fit many times over).
const MAX_IMAGE_BYTES: usize = 64 << 20;

/// One buffer's name, element type (tch's name for it: `Float`, `Int64`, `Bool`, ...),
/// shape and bytes (native, little-endian order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferImage {
    pub name: String,
    pub kind: String,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

fn kind_name(kind: Kind) -> String {
    format!("{kind:?}")
}

/// Copies `buffers` (from any device, of any element type) into images.
pub fn images(buffers: &[(String, Tensor)]) -> Result<Vec<BufferImage>, TrainError> {
    buffers
        .iter()
        .map(|(name, t)| {
            let host = t.f_to_device(Device::Cpu)?.f_contiguous()?;
            let n = host.numel();
            let mut bytes = vec![0u8; n * host.kind().elt_size_in_bytes()];
            host.f_copy_data_u8(&mut bytes, n)?;
            Ok(BufferImage {
                name: name.clone(),
                kind: kind_name(t.kind()),
                shape: t.size(),
                bytes,
            })
        })
        .collect()
}

/// Says why `images` do not fit `buffers` (another model), if they do not.
pub fn check(images: &[BufferImage], buffers: &[(String, Tensor)]) -> Result<(), String> {
    if images.len() != buffers.len() {
        return Err(format!(
            "{} buffers offered, the model has {}",
            images.len(),
            buffers.len()
        ));
    }
    for (img, (name, t)) in images.iter().zip(buffers) {
        let kind = kind_name(t.kind());
        if img.name != *name || img.kind != kind || img.shape != t.size() {
            return Err(format!(
                "buffer `{}` {} {:?} does not match this model's `{name}` {kind} {:?}",
                img.name,
                img.kind,
                img.shape,
                t.size()
            ));
        }
        let elems: i64 = img.shape.iter().product();
        if img.bytes.len() as i64 != elems * t.kind().elt_size_in_bytes() as i64 {
            return Err(format!(
                "buffer `{name}` carries {} bytes for {elems} values",
                img.bytes.len()
            ));
        }
    }
    Ok(())
}

/// Writes `images` into `buffers` in place (on their device), after [`check`].
pub fn restore(images: &[BufferImage], buffers: &[(String, Tensor)]) -> Result<(), TrainError> {
    check(images, buffers).map_err(TrainError::Transfer)?;
    tch::no_grad(|| -> Result<(), TrainError> {
        for (img, (_, t)) in images.iter().zip(buffers) {
            let host = Tensor::f_from_data_size(&img.bytes, &img.shape, t.kind())?;
            t.shallow_clone().f_copy_(&host)?;
        }
        Ok(())
    })
}

/// Makes every rank's `buffers` rank 0's, given `boundary`: every rank's copies of its buffers
/// at the last step boundary, where all ranks held the same ones. Rank 0 sends only the buffers
/// its step changed (running statistics, not a registered constant such as a positional
/// encoding or a mask, which would cost its whole size every step); every other rank takes
/// those and puts the rest back to the boundary's. Every rank of the group calls it at the same
/// point; a model without buffers, or a group of one, does nothing.
pub fn sync(
    group: &mut dyn Collective,
    buffers: &[(String, Tensor)],
    boundary: &[Tensor],
) -> Result<(), TrainError> {
    if buffers.is_empty() || group.world_size() < 2 {
        return Ok(());
    }
    let root = group.rank() == 0;
    let mut bytes = if root {
        let changed = changed(buffers, boundary)?;
        let sent: Vec<(String, Tensor)> = buffers
            .iter()
            .zip(changed)
            .filter(|(_, c)| *c)
            .map(|((n, t), _)| (n.clone(), t.shallow_clone()))
            .collect();
        bincode::serde::encode_to_vec(images(&sent)?, bincode::config::standard())
            .map_err(|e| TrainError::Transfer(format!("encoding the model's buffers: {e}")))?
    } else {
        Vec::new()
    };
    group.broadcast_bytes(&mut bytes, 0, MAX_IMAGE_BYTES)?;
    if root {
        return Ok(());
    }
    let (got, _): (Vec<BufferImage>, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
            .map_err(|e| TrainError::Transfer(format!("decoding rank 0's buffers: {e}")))?;
    // Rank 0's changed buffers, in the model's order; the others as at the boundary.
    let mut sent = got.into_iter().peekable();
    let mut images_in_order = Vec::new();
    let mut targets = Vec::new();
    tch::no_grad(|| -> Result<(), TrainError> {
        for ((name, t), copy) in buffers.iter().zip(boundary) {
            if sent.peek().is_some_and(|img| img.name == *name) {
                images_in_order.push(sent.next().expect("peeked"));
                targets.push((name.clone(), t.shallow_clone()));
            } else {
                t.shallow_clone().f_copy_(copy)?;
            }
        }
        Ok(())
    })?;
    if let Some(img) = sent.next() {
        return Err(TrainError::Transfer(format!(
            "rank 0 sent buffer `{}`, which this model does not have (or not in this order)",
            img.name
        )));
    }
    restore(&images_in_order, &targets)
}

/// Which of `buffers` differ from their `boundary` copies, read from the device once.
fn changed(buffers: &[(String, Tensor)], boundary: &[Tensor]) -> Result<Vec<bool>, TrainError> {
    if buffers.len() != boundary.len() {
        return Err(TrainError::Invalid(format!(
            "{} buffers with {} boundary copies",
            buffers.len(),
            boundary.len()
        )));
    }
    let flags = buffers
        .iter()
        .zip(boundary)
        .map(|((_, t), copy)| t.f_ne_tensor(copy)?.f_any()?.f_view([1]))
        .collect::<Result<Vec<_>, _>>()?;
    let flags = Tensor::f_cat(&flags, 0)?.f_to_device(Device::Cpu)?;
    let n = flags.numel();
    let mut out = vec![false; n];
    flags.f_copy_data(&mut out, n)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(mean: &[f32], count: i64) -> Vec<(String, Tensor)> {
        vec![
            ("n.num_batches_tracked".into(), Tensor::from(count)),
            ("n.running_mean".into(), Tensor::from_slice(mean)),
        ]
    }

    #[test]
    fn an_image_restores_exactly_in_any_type() {
        // A count beyond f32's exact integers and a value no short float keeps.
        let src = buffers(&[0.1, -3.5e-20], (1 << 40) + 3);
        let dst = buffers(&[0.0, 0.0], 0);
        restore(&images(&src).unwrap(), &dst).unwrap();
        assert_eq!(dst[0].1.int64_value(&[]), (1 << 40) + 3);
        assert_eq!(dst[0].1.kind(), Kind::Int64);
        assert!(dst[1].1.equal(&src[1].1));
        // A registered mask.
        let mask = |v: &[bool]| vec![("m".to_string(), Tensor::from_slice(v).view([2, 2]))];
        let (src, dst) = (mask(&[true, false, false, true]), mask(&[false; 4]));
        restore(&images(&src).unwrap(), &dst).unwrap();
        assert!(dst[0].1.equal(&src[0].1));
        assert_eq!(dst[0].1.kind(), Kind::Bool);
    }

    #[test]
    fn only_changed_buffers_travel_and_the_rest_return_to_the_boundary() {
        use crate::collective::{AbortHandle, CollectiveError};
        /// Rank 1 of two, receiving what `sent` holds.
        struct Receiver {
            sent: Vec<u8>,
        }
        impl Collective for Receiver {
            fn rank(&self) -> u32 {
                1
            }
            fn world_size(&self) -> u32 {
                2
            }
            fn generation(&self) -> u64 {
                1
            }
            fn all_reduce_sum(&mut self, _: &mut Tensor) -> Result<(), CollectiveError> {
                unreachable!()
            }
            fn broadcast(&mut self, _: &mut Tensor, _: u32) -> Result<(), CollectiveError> {
                unreachable!()
            }
            fn broadcast_bytes(
                &mut self,
                bytes: &mut Vec<u8>,
                _: u32,
                _: usize,
            ) -> Result<(), CollectiveError> {
                *bytes = self.sent.clone();
                Ok(())
            }
            fn barrier(&mut self) -> Result<(), CollectiveError> {
                Ok(())
            }
            fn abort_handle(&self) -> AbortHandle {
                AbortHandle::new()
            }
        }
        let named = |mean: f32, pe: f32| {
            vec![
                ("n.running_mean".to_string(), Tensor::from_slice(&[mean; 2])),
                ("pe".to_string(), Tensor::from_slice(&[pe; 3])),
            ]
        };
        // Rank 0's step moved the statistics and left the constant alone.
        let boundary: Vec<Tensor> = named(1.0, 7.0).into_iter().map(|(_, t)| t).collect();
        let rank0 = named(1.5, 7.0);
        let changed = changed(&rank0, &boundary).unwrap();
        assert_eq!(changed, [true, false]);
        let sent = images(&rank0[..1]).unwrap();
        assert_eq!(sent.len(), 1, "the constant does not travel");
        let mut group = Receiver {
            sent: bincode::serde::encode_to_vec(&sent, bincode::config::standard()).unwrap(),
        };
        // Rank 1's forward moved both (a constant it should not have touched included).
        let mine = named(2.0, 9.0);
        sync(&mut group, &mine, &boundary).unwrap();
        assert!(mine[0].1.equal(&rank0[0].1));
        assert!(mine[1].1.equal(&boundary[1]));
        // A buffer this model does not have is refused.
        let other = vec![("other".to_string(), Tensor::from_slice(&[0f32]))];
        group.sent =
            bincode::serde::encode_to_vec(images(&other).unwrap(), bincode::config::standard())
                .unwrap();
        let e = sync(&mut group, &mine, &boundary).unwrap_err();
        assert!(e.to_string().contains("rank 0 sent buffer `other`"), "{e}");
    }

    #[test]
    fn images_of_another_model_are_refused() {
        let src = images(&buffers(&[1.0, 2.0], 1)).unwrap();
        let e = check(&src, &buffers(&[1.0, 2.0, 3.0], 1)).unwrap_err();
        assert!(
            e.contains("`n.running_mean` Float [2] does not match") && e.contains("Float [3]"),
            "{e}"
        );
        let e = check(&src[..1], &buffers(&[1.0], 1)).unwrap_err();
        assert_eq!(e, "1 buffers offered, the model has 2");
        let mut short = src.clone();
        short[1].bytes.pop();
        let e = check(&short, &buffers(&[1.0, 2.0], 1)).unwrap_err();
        assert!(e.contains("7 bytes for 2 values"), "{e}");
    }
}
