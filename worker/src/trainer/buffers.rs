//! A model's buffers (BatchNorm's running statistics and batch count) between ranks.
//!
//! Buffers are small (two floats per normalized channel and one count per layer) and typed
//! (the count is i64, as PyTorch's `num_batches_tracked`), so they travel as bincode
//! [`BufferImage`]s through `broadcast_bytes` rather than in the fp32 buckets that carry
//! gradients and parameters: an image is exact in any dtype, and names, kinds and shapes are
//! checked on arrival.
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

/// The element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufferKind {
    F32,
    I64,
}

/// One buffer's name, type, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferImage {
    pub name: String,
    pub kind: BufferKind,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

fn kind_of(name: &str, t: &Tensor) -> Result<BufferKind, TrainError> {
    match t.kind() {
        Kind::Float => Ok(BufferKind::F32),
        Kind::Int64 => Ok(BufferKind::I64),
        k => Err(TrainError::Invalid(format!(
            "model buffer {name} is {k:?}: only f32 and i64 buffers are carried"
        ))),
    }
}

/// Copies `buffers` (from any device) into images.
pub fn images(buffers: &[(String, Tensor)]) -> Result<Vec<BufferImage>, TrainError> {
    buffers
        .iter()
        .map(|(name, t)| {
            let kind = kind_of(name, t)?;
            let host = t.f_to_device(Device::Cpu)?.f_contiguous()?;
            let n = host.numel();
            let bytes = match kind {
                BufferKind::F32 => {
                    let mut v = vec![0f32; n];
                    host.f_copy_data(&mut v, n)?;
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
                BufferKind::I64 => {
                    let mut v = vec![0i64; n];
                    host.f_copy_data(&mut v, n)?;
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                }
            };
            Ok(BufferImage {
                name: name.clone(),
                kind,
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
        let kind = kind_of(name, t).map_err(|e| e.to_string())?;
        let elems: i64 = img.shape.iter().product();
        if img.name != *name || img.kind != kind || img.shape != t.size() {
            return Err(format!(
                "buffer `{}` {:?} {:?} does not match this model's `{name}` {kind:?} {:?}",
                img.name,
                img.kind,
                img.shape,
                t.size()
            ));
        }
        let width = match kind {
            BufferKind::F32 => 4,
            BufferKind::I64 => 8,
        };
        if img.bytes.len() as i64 != elems * width {
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
            let host = match img.kind {
                BufferKind::F32 => {
                    let v: Vec<f32> = img
                        .bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    Tensor::f_from_slice(&v)?
                }
                BufferKind::I64 => {
                    let v: Vec<i64> = img
                        .bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect();
                    Tensor::f_from_slice(&v)?
                }
            };
            t.shallow_clone()
                .f_copy_(&host.f_view(img.shape.as_slice())?)?;
        }
        Ok(())
    })
}

/// Makes every rank's `buffers` rank 0's. Every rank of the group calls it at the same point;
/// a model without buffers, or a group of one, does nothing.
pub fn sync(group: &mut dyn Collective, buffers: &[(String, Tensor)]) -> Result<(), TrainError> {
    if buffers.is_empty() || group.world_size() < 2 {
        return Ok(());
    }
    let root = group.rank() == 0;
    let mut bytes = if root {
        bincode::serde::encode_to_vec(images(buffers)?, bincode::config::standard())
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
    restore(&got, buffers)
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
    fn an_image_restores_exactly_in_both_types() {
        // A count beyond f32's exact integers and a value no short float keeps.
        let src = buffers(&[0.1, -3.5e-20], (1 << 40) + 3);
        let dst = buffers(&[0.0, 0.0], 0);
        restore(&images(&src).unwrap(), &dst).unwrap();
        assert_eq!(dst[0].1.int64_value(&[]), (1 << 40) + 3);
        assert_eq!(dst[0].1.kind(), Kind::Int64);
        assert!(dst[1].1.equal(&src[1].1));
    }

    #[test]
    fn images_of_another_model_are_refused() {
        let src = images(&buffers(&[1.0, 2.0], 1)).unwrap();
        let e = check(&src, &buffers(&[1.0, 2.0, 3.0], 1)).unwrap_err();
        assert!(
            e.contains("`n.running_mean` F32 [2]") && e.contains("[3]"),
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
