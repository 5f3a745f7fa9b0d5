//! Sentence embeddings from an encoder's token states: pooling (mean, CLS
//! token, last token) and L2 normalization, configured as
//! sentence-transformers configures them (`modules.json`,
//! `1_Pooling/config.json`, a `Normalize` module).

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::ForwardBatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The mean of the sequence's token states.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// The last token's state (decoder-style embedding models).
    LastToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// Divide each vector by its L2 norm.
    pub normalize: bool,
}

#[derive(Debug, Deserialize)]
struct Module {
    path: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// For logs: "Mean pooling, normalized".
impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} pooling", self.mode)?;
        if self.normalize {
            write!(f, ", normalized")?;
        }
        Ok(())
    }
}

impl Pooling {
    /// An encoder without sentence-transformers' files: mean pooling,
    /// normalized (what most embedding checkpoints are trained for).
    pub const DEFAULT: Self = Self {
        mode: PoolingMode::Mean,
        normalize: true,
    };

    /// From a model folder's `modules.json` (and the pooling module's
    /// `config.json`); `default` when it has none (the architecture's).
    pub fn from_dir(dir: Option<&Path>, default: Self) -> anyhow::Result<Self> {
        let Some(dir) = dir else {
            return Ok(default);
        };
        let modules_path = dir.join("modules.json");
        let Ok(text) = std::fs::read_to_string(&modules_path) else {
            return Ok(default);
        };
        let modules: Vec<Module> = serde_json::from_str(&text)
            .with_context(|| format!("reading {}", modules_path.display()))?;
        let mut pooling = Self {
            mode: PoolingMode::Mean,
            normalize: false,
        };
        for m in &modules {
            let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            match kind {
                "Transformer" => {}
                "Normalize" => pooling.normalize = true,
                "Pooling" => {
                    let p = dir.join(m.path.as_deref().unwrap_or("1_Pooling")).join("config.json");
                    let c: PoolingConfig = match std::fs::read_to_string(&p) {
                        Ok(t) => serde_json::from_str(&t).with_context(|| format!("reading {}", p.display()))?,
                        Err(_) => PoolingConfig {
                            pooling_mode_mean_tokens: true,
                            ..Default::default()
                        },
                    };
                    if c.pooling_mode_max_tokens || c.pooling_mode_mean_sqrt_len_tokens || c.pooling_mode_weightedmean_tokens {
                        anyhow::bail!("{}: only mean, CLS and last-token pooling are supported", p.display());
                    }
                    pooling.mode = match (c.pooling_mode_cls_token, c.pooling_mode_mean_tokens, c.pooling_mode_lasttoken) {
                        (true, false, false) => PoolingMode::Cls,
                        (false, true, false) => PoolingMode::Mean,
                        (false, false, true) => PoolingMode::LastToken,
                        _ => anyhow::bail!("{}: exactly one pooling mode must be set", p.display()),
                    };
                }
                other => anyhow::bail!(
                    "{}: the sentence-transformers module {other:?} is not supported (Transformer, Pooling, Normalize)",
                    modules_path.display()
                ),
            }
        }
        Ok(pooling)
    }

    /// One vector per sequence of `batch` whose last token is in
    /// `batch.logits_indices` (in that order), from the token states `x`
    /// (`[tokens, hidden]`, whole sequences); f32.
    pub fn forward(&self, x: &Tensor, batch: &ForwardBatch) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let rows = batch
            .logits_indices
            .iter()
            .map(|&i| {
                let i = i as usize;
                let Some(s) = batch
                    .seqs
                    .iter()
                    .find(|s| i + 1 == s.query_start + s.query_len)
                else {
                    candle_core::bail!("pooling: token {i} does not end a sequence of the batch");
                };
                if s.num_cached() != 0 {
                    candle_core::bail!(
                        "pooling needs whole sequences, got one after {} cached tokens",
                        s.num_cached()
                    );
                }
                let v = match self.mode {
                    PoolingMode::Mean => x.narrow(0, s.query_start, s.query_len)?.mean(0)?,
                    PoolingMode::Cls => x.get(s.query_start)?,
                    PoolingMode::LastToken => x.get(i)?,
                };
                if self.normalize {
                    let mut vals = v.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    l2_normalize(&mut vals);
                    Tensor::from_vec(vals, v.dims1()?, v.device())?.to_dtype(v.dtype())
                } else {
                    Ok(v)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Tensor::zeros((0, x.dim(1)?), DType::F32, x.device());
        }
        Tensor::stack(&rows, 0)
    }
}

/// Divides `v` by its L2 norm, as `torch.nn.functional.normalize` does (by
/// at least 1e-12, so a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}
