//! The `transformer` model: a decoder-only GPT over token sequences, as nanoGPT writes it.
//! Each sample's features are its `T` token ids (f32, exact); the model embeds them (`wte`
//! plus the learned position embedding `wpe`), runs `layers` pre-LayerNorm blocks
//! (`x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, causal multi-head self-attention through a
//! fused `c_attn` and `c_proj`, an MLP `c_fc` → GELU (exact) → `c_proj` of 4× the width), a
//! final `ln_f`, and outputs logits `[n, T, vocab]` through `wte` transposed (tied embeddings)
//! or `lm_head` (no bias). Parameter names are nanoGPT's (`wte.weight`, `h.0.ln_1.weight`,
//! `h.0.attn.c_attn.weight`, ..., `ln_f.bias`) so `model.safetensors` loads into that module
//! with a strict `load_state_dict`.
//!
//! Attention is computed explicitly (scores, causal mask, softmax, values) rather than through
//! a fused kernel: its dropout, like every dropout here, is a mask drawn per sample from
//! [`SampleNoise`] (`[heads, T, T]` on the attention weights, `[T, width]` on the embeddings
//! and each residual branch), so W workers compute the same run as one. GPT-2's
//! initialisation: weights normal(0, 0.02), biases zero, LayerNorms one and zero.

use super::{AllocError, BuildError, dropout, parameter};
use crate::sample_rng::{SampleNoise, Stream};
use ringmaster_common::jobspec::TransformerSpec;
use tch::nn::{self, Init};
use tch::{Kind, TchError, Tensor};

/// PyTorch `nn.LayerNorm`'s default epsilon, which nanoGPT keeps.
const LN_EPS: f64 = 1e-5;
/// GPT-2's weight initialisation: normal with this standard deviation.
const INIT_STD: f64 = 0.02;

/// A GPT language model; see the module docs.
#[derive(Debug)]
pub struct Transformer {
    context: i64,
    heads: i64,
    width: i64,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    /// `None` with tied embeddings: the head is `wte`.
    lm_head: Option<Tensor>,
    dropout: f64,
}

#[derive(Debug)]
struct Block {
    ln_1: Norm,
    c_attn: Dense,
    attn_proj: Dense,
    ln_2: Norm,
    c_fc: Dense,
    mlp_proj: Dense,
}

/// `nn.LayerNorm(width)`.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

/// `nn.Linear` with GPT-2's initialisation.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(path: &nn::Path, name: &str, width: i64) -> Result<Self, AllocError> {
        let p = path / name;
        Ok(Norm {
            weight: parameter(&p, name, "weight", &[width], Init::Const(1.0))?,
            bias: parameter(&p, name, "bias", &[width], Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let width = x.size().last().copied().unwrap_or(0);
        x.f_layer_norm([width], Some(&self.weight), Some(&self.bias), LN_EPS, false)
    }
}

impl Dense {
    fn new(path: &nn::Path, name: &str, inputs: i64, outputs: i64) -> Result<Self, AllocError> {
        let p = path / name;
        Ok(Dense {
            weight: parameter(&p, name, "weight", &[outputs, inputs], normal())?,
            bias: parameter(&p, name, "bias", &[outputs], Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

fn normal() -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: INIT_STD,
    }
}

impl Transformer {
    /// Creates the parameters under `root` for samples of `inputs` tokens over a vocabulary of
    /// `vocab`. `model.context` must be the dataset's tokens per sample.
    pub fn new(
        root: &nn::Path,
        inputs: i64,
        vocab: i64,
        spec: &TransformerSpec,
    ) -> Result<Self, BuildError> {
        let context = i64::from(spec.context);
        if context != inputs {
            return Err(BuildError::Shape(format!(
                "model.context is {context} but the training set's samples hold {inputs} tokens; \
                 set model.context = {inputs} (the --context the dataset was packed with)"
            )));
        }
        let (width, heads) = (i64::from(spec.width), i64::from(spec.heads));
        if heads == 0 || width % heads != 0 {
            return Err(BuildError::Shape(format!(
                "model.width ({width}) must be divisible by model.heads ({heads})"
            )));
        }
        let wte = parameter(&(root / "wte"), "wte", "weight", &[vocab, width], normal())?;
        let wpe = parameter(
            &(root / "wpe"),
            "wpe",
            "weight",
            &[context, width],
            normal(),
        )?;
        let h = root / "h";
        let mut blocks = Vec::with_capacity(spec.layers as usize);
        for l in 0..spec.layers {
            let b = &h / l;
            let (attn, mlp) = (&b / "attn", &b / "mlp");
            blocks.push(Block {
                ln_1: Norm::new(&b, "ln_1", width)?,
                c_attn: Dense::new(&attn, "c_attn", width, 3 * width)?,
                attn_proj: Dense::new(&attn, "c_proj", width, width)?,
                ln_2: Norm::new(&b, "ln_2", width)?,
                c_fc: Dense::new(&mlp, "c_fc", width, 4 * width)?,
                mlp_proj: Dense::new(&mlp, "c_proj", 4 * width, width)?,
            });
        }
        let ln_f = Norm::new(root, "ln_f", width)?;
        let lm_head = if spec.tied_embeddings {
            None
        } else {
            Some(parameter(
                &(root / "lm_head"),
                "lm_head",
                "weight",
                &[vocab, width],
                normal(),
            )?)
        };
        Ok(Transformer {
            context,
            heads,
            width,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            dropout: spec.dropout,
        })
    }

    /// Logits `[n, T, vocab]` for a batch of token ids `[n, T]` (f32); with `noise`, dropout
    /// masks are drawn per sample.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        noise: Option<&SampleNoise>,
    ) -> Result<Tensor, TchError> {
        let size = xs.size();
        if size.len() != 2 || size[1] != self.context {
            return Err(TchError::Shape(format!(
                "the transformer takes [batch, {}] token ids, got {size:?}",
                self.context
            )));
        }
        let (n, t, c) = (size[0], self.context, self.width);
        let drop = |x: Tensor, stream: u32| -> Result<Tensor, TchError> {
            match noise {
                Some(noise) if self.dropout > 0.0 => {
                    dropout(&x, self.dropout, noise, Stream::dropout(stream))
                }
                _ => Ok(x),
            }
        };
        let idx = xs.f_to_kind(Kind::Int64)?;
        let tok = Tensor::f_embedding(&self.wte, &idx, -1, false, false)?;
        let mut x = drop(tok.f_add(&self.wpe)?, 0)?;
        let hd = c / self.heads;
        let causal = Tensor::f_ones([t, t], (Kind::Bool, xs.device()))?
            .f_tril(0)?
            .f_logical_not()?;
        for (l, block) in self.blocks.iter().enumerate() {
            // Streams: 0 the embeddings, then three per block.
            let s = 1 + 3 * l as u32;
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let heads = |part: i64| -> Result<Tensor, TchError> {
                qkv.f_narrow(2, part * c, c)?
                    .f_view([n, t, self.heads, hd])?
                    .f_transpose(1, 2)
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let scores = q
                .f_matmul(&k.f_transpose(-2, -1)?)?
                .f_mul_scalar(1.0 / (hd as f64).sqrt())?
                .f_masked_fill(&causal, f64::NEG_INFINITY)?;
            let att = drop(scores.f_softmax(-1, Kind::Float)?, s)?;
            let y = att
                .f_matmul(&v)?
                .f_transpose(1, 2)?
                .f_contiguous()?
                .f_view([n, t, c])?;
            x = x.f_add(&drop(block.attn_proj.forward(&y)?, s + 1)?)?;
            let hidden = block
                .c_fc
                .forward(&block.ln_2.forward(&x)?)?
                .f_gelu("none")?;
            x = x.f_add(&drop(block.mlp_proj.forward(&hidden)?, s + 2)?)?;
        }
        let x = self.ln_f.forward(&x)?;
        x.f_linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.wte), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn spec(dropout: f64, tied: bool) -> TransformerSpec {
        TransformerSpec {
            layers: 2,
            heads: 2,
            width: 8,
            context: 5,
            dropout,
            tied_embeddings: tied,
        }
    }

    fn tokens(rows: &[[f32; 5]]) -> Tensor {
        Tensor::from_slice(rows.concat().as_slice()).view([rows.len() as i64, 5])
    }

    #[test]
    fn parameters_have_nanogpt_names_and_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        Transformer::new(&vs.root(), 5, 11, &spec(0.0, false)).unwrap();
        let mut names: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        names.sort();
        let get = |name: &str| {
            names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
        };
        assert_eq!(names.len(), 2 + 12 * 2 + 2 + 1);
        assert_eq!(get("wte.weight"), Some(vec![11, 8]));
        assert_eq!(get("wpe.weight"), Some(vec![5, 8]));
        assert_eq!(get("h.1.attn.c_attn.weight"), Some(vec![24, 8]));
        assert_eq!(get("h.1.attn.c_proj.bias"), Some(vec![8]));
        assert_eq!(get("h.0.mlp.c_fc.weight"), Some(vec![32, 8]));
        assert_eq!(get("h.0.mlp.c_proj.weight"), Some(vec![8, 32]));
        assert_eq!(get("h.0.ln_2.bias"), Some(vec![8]));
        assert_eq!(get("ln_f.weight"), Some(vec![8]));
        assert_eq!(get("lm_head.weight"), Some(vec![11, 8]));
    }

    #[test]
    fn a_position_sees_only_the_past() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Transformer::new(&vs.root(), 5, 11, &spec(0.0, true)).unwrap();
        let a = m.forward(&tokens(&[[1., 2., 3., 4., 5.]]), None).unwrap();
        let b = m.forward(&tokens(&[[1., 2., 3., 9., 0.]]), None).unwrap();
        assert_eq!(a.size(), [1, 5, 11]);
        // Positions 0..3 are identical; position 3 changed with its own token.
        let diff = |p: i64| {
            (a.select(1, p) - b.select(1, p))
                .abs()
                .max()
                .double_value(&[])
        };
        for p in 0..3 {
            assert_eq!(diff(p), 0.0, "position {p}");
        }
        assert!(diff(3) > 1e-4);
    }

    #[test]
    fn dropout_is_drawn_per_sample_whatever_the_batch() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Transformer::new(&vs.root(), 5, 11, &spec(0.3, true)).unwrap();
        let x = tokens(&[[1., 2., 3., 4., 5.], [6., 7., 8., 9., 10.]]);
        let both = m
            .forward(&x, Some(&SampleNoise::new(3, 7, &[40, 41], Device::Cpu)))
            .unwrap();
        let second = m
            .forward(
                &x.narrow(0, 1, 1),
                Some(&SampleNoise::new(3, 7, &[41], Device::Cpu)),
            )
            .unwrap();
        // The same masks alone as in a batch (up to float summation order in the matmuls).
        let gap = (both.narrow(0, 1, 1) - &second)
            .abs()
            .max()
            .double_value(&[]);
        assert!(gap < 1e-5, "{gap}");
        let eval = m.forward(&x, None).unwrap();
        assert!((both - eval).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn a_context_unlike_the_datasets_is_refused() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = Transformer::new(&vs.root(), 64, 256, &spec(0.0, true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.context is 5"), "{err}");
        assert!(err.contains("set model.context = 64"), "{err}");
    }
}
