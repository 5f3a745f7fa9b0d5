//! `.gguf` files: metadata and tensors, dequantized to the working dtype.
//! Each architecture maps the metadata to its config and the tensor names to
//! its Hugging Face names (`crate::models`); the tokenizer and chat template
//! come from the `tokenizer.*` metadata (`crate::tokenizer`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

/// A GGUF file's contents.
pub struct GgufFile {
    pub metadata: HashMap<String, Value>,
    /// Tensors under their GGUF names.
    pub tensors: HashMap<String, Tensor>,
}

/// Typed access to GGUF metadata with errors that name the key.
pub struct Meta<'a>(pub &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    pub fn u64(&self, key: &str) -> anyhow::Result<Option<u64>> {
        self.get(key)
            .map(|v| match v {
                Value::U8(x) => Ok(*x as u64),
                Value::U16(x) => Ok(*x as u64),
                Value::U32(x) => Ok(*x as u64),
                Value::U64(x) => Ok(*x),
                Value::I8(x) if *x >= 0 => Ok(*x as u64),
                Value::I16(x) if *x >= 0 => Ok(*x as u64),
                Value::I32(x) if *x >= 0 => Ok(*x as u64),
                Value::I64(x) if *x >= 0 => Ok(*x as u64),
                other => {
                    bail!("GGUF metadata {key}: expected an unsigned integer, found {other:?}")
                }
            })
            .transpose()
    }

    pub fn usize_req(&self, key: &str) -> anyhow::Result<usize> {
        Ok(self
            .u64(key)?
            .with_context(|| format!("GGUF metadata lacks {key}"))? as usize)
    }

    pub fn f32(&self, key: &str) -> anyhow::Result<Option<f32>> {
        self.get(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => bail!("GGUF metadata {key}: expected a float, found {other:?}"),
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> anyhow::Result<Option<&'a str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => bail!(
                    "GGUF metadata {key}: expected a string, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> anyhow::Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => bail!(
                    "GGUF metadata {key}: expected a bool, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }

    pub fn array(&self, key: &str) -> anyhow::Result<Option<&'a Vec<Value>>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => Ok(a),
                other => bail!(
                    "GGUF metadata {key}: expected an array, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }
}

/// llama.cpp stores Llama q/k rows interleaved for its RoPE; undo that so the
/// half-split RoPE of the Hugging Face layout applies.
pub fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((heads, out / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

impl GgufFile {
    /// Reads the metadata and every tensor, dequantized to `dtype`.
    pub fn read(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let q = content
                .tensor(&mut reader, name, device)
                .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
            tensors.insert(name.clone(), q.dequantize(device)?.to_dtype(dtype)?);
        }
        Ok(Self {
            metadata: content.metadata,
            tensors,
        })
    }

    pub fn meta(&self) -> Meta<'_> {
        Meta(&self.metadata)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> anyhow::Result<&str> {
        self.meta()
            .str("general.architecture")?
            .context("GGUF metadata lacks general.architecture")
    }

    /// Takes the tensors, renamed by `rename` (GGUF name to Hugging Face
    /// name); those it returns `None` for are dropped with a warning.
    pub fn take_tensors(
        &mut self,
        mut rename: impl FnMut(&str) -> Option<String>,
    ) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, t) in self.tensors.drain() {
            match rename(&name) {
                Some(hf) => {
                    out.insert(hf, t);
                }
                None => tracing::warn!("ignoring unknown GGUF tensor {name}"),
            }
        }
        out
    }
}

/// The `blk.N.` layer index and the rest of a per-layer GGUF tensor name.
pub fn layer_part(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (h, d, inp) = (2, 4, 3);
        let w = Tensor::arange(0f32, (h * d * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((h * d, inp))
            .unwrap();
        let permuted = w
            .reshape((h, 2, d / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((h * d, inp))
            .unwrap();
        let back = unpermute(&permuted, h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
