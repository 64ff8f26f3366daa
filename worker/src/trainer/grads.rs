//! Gradient buckets: the parameters' gradients live in a few flat fp32 tensors on the model's
//! device, and each parameter's `.grad` is a view into one of them (what PyTorch DDP calls
//! `gradient_as_bucket_view`). Backward accumulates straight into the buckets, so reducing a
//! bucket is one collective call on memory that is already contiguous: no copy per parameter,
//! and on CPU no copy at all.
//!
//! The last bucket carries a few extra slots after its gradients ("extras": the batch's loss and
//! the control flags every rank must agree on), summed in the same operation.

use super::TrainError;
use crate::collective::Collective;
use crate::model;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Gradients are fused into buckets of about this many bytes per all-reduce.
pub const BUCKET_BYTES: usize = 25 << 20;

/// One flat tensor holding the gradients of consecutive parameters.
struct Bucket {
    /// Gradient elements (the extras, on the last bucket, come after them).
    len: usize,
    flat: Tensor,
}

/// The gradient buckets of one model, built once per [`Run`](super::run::Run).
pub struct GradBuckets {
    buckets: Vec<Bucket>,
    extras: usize,
}

impl GradBuckets {
    /// Groups `params` (in their fixed order, the same on every rank) into buckets of about
    /// [`BUCKET_BYTES`], allocates them on `device`, and rebinds every parameter's `.grad` to its
    /// slice of a bucket. `extras` slots follow the last bucket's gradients.
    pub fn bind(params: &[Tensor], extras: usize, device: Device) -> Result<Self, TrainError> {
        let ranges = bucket_ranges(params, BUCKET_BYTES);
        // Autograd only has a `.grad` to rebind once one exists: a backward pass through a zero
        // makes one for every parameter.
        if let Some(first) = params.first() {
            let mut zero = first.f_sum(Kind::Float)?.f_mul_scalar(0.0)?;
            for p in &params[1..] {
                zero = zero.f_add(&p.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
            }
            zero.f_backward()?;
        }
        let mut buckets = Vec::with_capacity(ranges.len().max(1));
        for (i, range) in ranges.iter().enumerate() {
            let len: usize = params[range.clone()].iter().map(|p| p.numel()).sum();
            let slack = if i + 1 == ranges.len() { extras } else { 0 };
            let flat = model::zeros(
                "gradient bucket",
                &[(len + slack) as i64],
                Kind::Float,
                device,
            )?;
            let mut off = 0i64;
            for p in &params[range.clone()] {
                let k = p.numel() as i64;
                let view = flat.f_narrow(0, off, k)?.f_view(p.size().as_slice())?;
                p.f_grad()?.f_set_data(&view)?;
                off += k;
            }
            buckets.push(Bucket { len, flat });
        }
        if buckets.is_empty() {
            // A model without parameters still needs somewhere to carry the extras.
            buckets.push(Bucket {
                len: 0,
                flat: model::zeros("gradient bucket", &[extras as i64], Kind::Float, device)?,
            });
        }
        Ok(GradBuckets { buckets, extras })
    }

    /// Zeroes every gradient (one kernel per bucket) before a step's backward pass.
    pub fn zero(&mut self) -> Result<(), TrainError> {
        for b in &mut self.buckets {
            let _ = b.flat.f_zero_()?;
        }
        Ok(())
    }

    /// Sums every bucket over the group and scales the gradients by `scale`; `extras` ride with
    /// the last bucket and come back summed (unscaled).
    pub fn all_reduce(
        &mut self,
        collective: &mut dyn Collective,
        extras: &mut [f32],
        scale: f64,
    ) -> Result<(), TrainError> {
        if extras.len() != self.extras {
            return Err(TrainError::Invalid(format!(
                "{} extras for buckets built with {}",
                extras.len(),
                self.extras
            )));
        }
        let last = self.buckets.len() - 1;
        for (i, b) in self.buckets.iter_mut().enumerate() {
            if i == last && !extras.is_empty() {
                let mut slots = b.flat.f_narrow(0, b.len as i64, extras.len() as i64)?;
                slots.f_copy_(&Tensor::f_from_slice(extras)?)?;
            }
            collective.all_reduce_sum(&mut b.flat)?;
            if i == last && !extras.is_empty() {
                let summed = b
                    .flat
                    .f_narrow(0, b.len as i64, extras.len() as i64)?
                    .f_to_device(Device::Cpu)?;
                summed.f_copy_data(extras, extras.len())?;
            }
            if b.len > 0 {
                let _ = b.flat.f_narrow(0, 0, b.len as i64)?.f_mul_scalar_(scale)?;
            }
        }
        Ok(())
    }
}

/// Groups consecutive tensors into runs of about `bytes` each (a tensor is
/// never split): gradient buckets here, state-transfer chunks elsewhere.
pub(super) fn bucket_ranges(params: &[Tensor], bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut filled = 0;
    for (i, p) in params.iter().enumerate() {
        filled += p.numel() * 4;
        if filled >= bytes {
            out.push(start..i + 1);
            start = i + 1;
            filled = 0;
        }
    }
    if start < params.len() {
        out.push(start..params.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{DataPlaneListener, RingBackend, RingConfig};

    fn param(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true)
    }

    #[test]
    fn buckets_cover_every_parameter_once_in_order() {
        let ps: Vec<Tensor> = [10, 300, 5, 700, 1]
            .iter()
            .map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu)))
            .collect();
        let ranges = bucket_ranges(&ps, 1200);
        assert_eq!(ranges, vec![0..2, 2..4, 4..5]);
        assert_eq!(bucket_ranges(&ps, usize::MAX), vec![0..5]);
        assert!(bucket_ranges(&[], 1).is_empty());
    }

    #[test]
    fn backward_accumulates_into_the_bucket_and_zero_clears_it() {
        let w = param(&[3, 4], 1);
        let b = param(&[3], 2);
        let params = [w.shallow_clone(), b.shallow_clone()];
        let mut g = GradBuckets::bind(&params, 2, Device::Cpu).unwrap();
        assert_eq!(g.buckets.len(), 1);
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let loss = || x.linear(&w, Some(&b)).pow_tensor_scalar(2).sum(Kind::Float);
        g.zero().unwrap();
        loss().backward();
        let flat = g.buckets[0].flat.shallow_clone();
        let expect = Tensor::cat(&[w.grad().view([-1]), b.grad().view([-1])], 0);
        assert_eq!(flat.narrow(0, 0, 15), expect);
        assert!(expect.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        // A second backward without zeroing accumulates, as autograd does.
        loss().backward();
        assert_eq!(flat.narrow(0, 0, 15), &expect * 2.0);
        g.zero().unwrap();
        assert_eq!(w.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn reduction_scales_gradients_but_not_extras() {
        let w = param(&[4], 3);
        let params = [w.shallow_clone()];
        let mut g = GradBuckets::bind(&params, 2, Device::Cpu).unwrap();
        let listener = DataPlaneListener::bind("127.0.0.1:0").unwrap();
        let mut ring =
            RingBackend::connect(&listener, RingConfig::new("g", 1, 0, vec!["x".into()])).unwrap();
        g.zero().unwrap();
        (&w * 3.0).sum(Kind::Float).backward();
        let mut extras = [7.0f32, 1.0];
        g.all_reduce(&mut ring, &mut extras, 0.5).unwrap();
        assert_eq!(extras, [7.0, 1.0]);
        assert_eq!(w.grad(), Tensor::from_slice(&[1.5f32; 4]));
        let e = g.all_reduce(&mut ring, &mut [0.0], 1.0).unwrap_err();
        assert!(e.to_string().contains("1 extras"), "{e}");
    }
}
