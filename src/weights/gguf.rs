//! `.gguf` files: the metadata up front, each tensor read from the file only
//! when the model asks for it. Tensors in a format with a native kernel
//! ([`crate::kernels::cpu::quant`]) stay in their blocks; the others are
//! dequantized to the working dtype one at a time. Each architecture maps the
//! metadata to its config and the tensor names to its Hugging Face names
//! (`crate::models`); the tokenizer and chat template come from the
//! `tokenizer.*` metadata (`crate::tokenizer`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{QuantSource, Weights};
use crate::kernels::cpu::quant::{QMatrix, QType};

/// A GGUF file: its metadata, and where each tensor's bytes are.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    pub metadata: HashMap<String, Value>,
    infos: HashMap<String, TensorInfo>,
    data_offset: u64,
    /// Whether matrices with a native kernel stay in their blocks.
    blocks: bool,
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
    /// Reads the metadata and the tensor directory; no tensor data yet.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::new(file.try_clone()?);
        let content = Content::read(&mut reader)
            .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        let len = file.metadata()?.len();
        for (name, info) in &content.tensor_infos {
            let end = content.tensor_data_offset + info.offset + tensor_bytes(info) as u64;
            if end > len {
                bail!(
                    "{}: tensor {name} ends past the end of the file",
                    path.display()
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            metadata: content.metadata,
            infos: content.tensor_infos,
            data_offset: content.tensor_data_offset,
            blocks: true,
        })
    }

    pub fn meta(&self) -> Meta<'_> {
        Meta(&self.metadata)
    }

    /// `false`: every tensor is dequantized to the working dtype.
    pub fn keep_blocks(&mut self, blocks: bool) {
        self.blocks = blocks;
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> anyhow::Result<&str> {
        self.meta()
            .str("general.architecture")?
            .context("GGUF metadata lacks general.architecture")
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// A tensor's dimensions, outermost first (as candle and Hugging Face
    /// order them).
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.infos.get(name).map(|i| i.shape.dims())
    }

    /// The vocabulary size: the rows of the token embedding table, which
    /// every decoder has (the tokenizer's list may be shorter, padded rows
    /// included in the table).
    pub fn vocab_size(&self) -> anyhow::Result<usize> {
        Ok(self
            .dims("token_embd.weight")
            .context("GGUF file lacks token_embd.weight")?[0])
    }

    /// Bytes of all tensor data in the file.
    pub fn tensor_bytes(&self) -> usize {
        self.infos.values().map(tensor_bytes).sum()
    }

    fn info(&self, name: &str) -> candle_core::Result<&TensorInfo> {
        self.infos.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}", self.path.display()))
        })
    }

    /// `buf.len()` bytes of tensor `name`'s data from byte `at` of it.
    fn read(
        &self,
        name: &str,
        info: &TensorInfo,
        at: usize,
        buf: &mut [u8],
    ) -> candle_core::Result<()> {
        let offset = self.data_offset + info.offset + at as u64;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            candle_core::Error::Msg(format!("{}: reading {name}: {e}", self.path.display()))
        })
    }

    /// A tensor's bytes as stored.
    fn raw(&self, name: &str) -> candle_core::Result<Vec<u8>> {
        let info = self.info(name)?;
        let mut buf = vec![0u8; tensor_bytes(info)];
        self.read(name, info, 0, &mut buf)?;
        Ok(buf)
    }

    /// A tensor's bytes, `rows` rows of equal size, with row `dst` of the
    /// result read from row `src(dst)` of the file.
    fn raw_rows(
        &self,
        name: &str,
        rows: usize,
        src: impl Fn(usize) -> candle_core::Result<usize>,
    ) -> candle_core::Result<Vec<u8>> {
        let info = self.info(name)?;
        let len = tensor_bytes(info);
        if rows == 0 || !len.is_multiple_of(rows) {
            candle_core::bail!("{name}: {len} bytes are not {rows} rows");
        }
        let rb = len / rows;
        let mut buf = vec![0u8; len];
        for (dst, row) in buf.chunks_exact_mut(rb).enumerate() {
            self.read(name, info, src(dst)? * rb, row)?;
        }
        Ok(buf)
    }

    /// A tensor dequantized to `dtype`.
    pub fn dequantize(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        dequantize_bytes(
            self.raw(name)?,
            info.ggml_dtype,
            info.shape.clone(),
            dtype,
            device,
        )
    }

    /// Weights under Hugging Face names. `rename` maps GGUF names to them
    /// (unknown tensors are skipped with a warning); `layout` says which
    /// need their rows rearranged to the Hugging Face layout.
    pub fn into_weights(
        self,
        rename: impl Fn(&str) -> Option<String>,
        layout: impl Fn(&str) -> Layout,
        dtype: DType,
        device: &Device,
    ) -> Weights<'static> {
        let mut names = HashMap::new();
        let mut fallback = Vec::new();
        for (name, info) in &self.infos {
            match rename(name) {
                Some(hf) => {
                    if self.blocks
                        && QType::from_ggml(info.ggml_dtype).is_none()
                        && !matches!(
                            info.ggml_dtype,
                            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                        )
                    {
                        fallback.push(format!("{name} ({:?})", info.ggml_dtype));
                    }
                    let l = layout(&hf);
                    names.insert(hf, (name.clone(), l));
                }
                None => tracing::warn!("ignoring unknown GGUF tensor {name}"),
            }
        }
        if !fallback.is_empty() {
            fallback.sort();
            tracing::warn!(
                "{} GGUF tensors have no native kernel and are dequantized at load (then follow --quantization): {}",
                fallback.len(),
                fallback.join(", ")
            );
        }
        let blocks = self.blocks;
        let source = Arc::new(GgufSource {
            file: self,
            names,
            cache: Mutex::new(HashMap::new()),
        });
        let backend: Box<dyn SimpleBackend> = Box::new(Dense(source.clone()));
        let vb = candle_nn::VarBuilder::from_backend(backend, dtype, device.clone());
        match blocks {
            true => Weights::new(vb, Some(source)),
            false => Weights::dense(vb),
        }
    }
}

/// Stored bytes of type `ty` as a `shape` tensor of `dtype`.
fn dequantize_bytes(
    raw: Vec<u8>,
    ty: GgmlDType,
    shape: Shape,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let storage = QStorage::from_data(Cow::Owned(raw), device, ty)?;
    QTensor::new(storage, shape)?
        .dequantize(device)?
        .to_dtype(dtype)
}

fn tensor_bytes(info: &TensorInfo) -> usize {
    info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()
}

/// How a GGUF tensor's rows differ from the Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Same,
    /// llama.cpp's interleaved q/k rows for its RoPE, over this many heads.
    Permuted(usize),
    /// GPT-2's `Conv1D` weights are `[in, out]` in Hugging Face checkpoints
    /// and `[out, in]` in GGUF. Quantized blocks always come as `[out, in]`.
    Transposed,
}

/// A GGUF file seen through Hugging Face names.
struct GgufSource {
    file: GgufFile,
    names: HashMap<String, (String, Layout)>,
    /// Quantized matrices already read: a tied output head shares the
    /// embedding table's blocks.
    cache: Mutex<HashMap<String, Arc<QMatrix>>>,
}

impl GgufSource {
    fn lookup(&self, hf: &str) -> candle_core::Result<&(String, Layout)> {
        self.names.get(hf).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: hf.to_string(),
            }
            .bt()
        })
    }
}

impl QuantSource for GgufSource {
    fn quantized(&self, hf: &str) -> Option<candle_core::Result<Arc<QMatrix>>> {
        let (name, layout) = self.names.get(hf)?;
        let info = self.file.infos.get(name)?;
        let ty = QType::from_ggml(info.ggml_dtype)?;
        let &[n, k] = info.shape.dims() else {
            return None;
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(name) {
            return Some(Ok(m.clone()));
        }
        let raw = match layout {
            // Rows read straight into their places: no second copy of the
            // tensor, whose freed buffer would linger in the heap.
            Layout::Permuted(heads) => self
                .file
                .raw_rows(name, n, |dst| unpermuted_row(dst, n, *heads)),
            _ => self.file.raw(name),
        };
        let m = raw.and_then(|raw| QMatrix::new(ty, n, k, raw));
        Some(m.map(|m| {
            let m = Arc::new(m);
            cache.insert(name.clone(), m.clone());
            m
        }))
    }

    fn quantized_slice(&self, hf: &str, index: usize) -> Option<candle_core::Result<Arc<QMatrix>>> {
        let (name, _) = self.names.get(hf)?;
        QType::from_ggml(self.file.infos.get(name)?.ggml_dtype)?;
        let m = self.slice(hf, index)?.and_then(|s| {
            let ty = QType::from_ggml(s.ty).expect("checked above");
            QMatrix::new(ty, s.n, s.k, s.bytes)
        });
        Some(m.map(Arc::new))
    }

    fn dense_slice(
        &self,
        hf: &str,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Option<candle_core::Result<Tensor>> {
        let t = self
            .slice(hf, index)?
            .and_then(|s| dequantize_bytes(s.bytes, s.ty, (s.n, s.k).into(), dtype, device));
        Some(t)
    }
}

/// One matrix of a stack, as stored: its bytes, type and `[n, k]` shape.
struct Slice {
    bytes: Vec<u8>,
    ty: GgmlDType,
    n: usize,
    k: usize,
}

impl GgufSource {
    /// Matrix `index` of the `[count, n, k]` stack `hf` (an MoE layer's
    /// experts), read from its range in the file.
    fn slice(&self, hf: &str, index: usize) -> Option<candle_core::Result<Slice>> {
        let (name, _) = self.names.get(hf)?;
        let info = self.file.infos.get(name)?;
        let &[count, n, k] = info.shape.dims() else {
            return None;
        };
        let read = || {
            if index >= count {
                candle_core::bail!("{name}: no matrix {index} in a stack of {count}");
            }
            let len = tensor_bytes(info) / count;
            let mut bytes = vec![0u8; len];
            self.file.read(name, info, index * len, &mut bytes)?;
            Ok(Slice {
                bytes,
                ty: info.ggml_dtype,
                n,
                k,
            })
        };
        Some(read())
    }
}

/// The dense side, for candle's `VarBuilder`.
struct Dense(Arc<GgufSource>);

impl SimpleBackend for Dense {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut t = self.get_unchecked(name, dtype, dev)?;
        // llama.cpp's converter squeezes `[1, n]` matrices (Qwen2-MoE's
        // shared expert gate) to vectors of `n`.
        if t.rank() == 1 && s.rank() == 2 && s.dims()[0] == 1 && t.elem_count() == s.elem_count() {
            t = t.reshape(s.dims())?;
        }
        super::expect_shape(t, &s, name, "the GGUF file")
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (gguf, layout) = self.0.lookup(name)?;
        let t = self.0.file.dequantize(gguf, dtype, dev)?;
        match layout {
            Layout::Same => Ok(t),
            Layout::Permuted(heads) => unpermute(&t, *heads),
            Layout::Transposed => t.t()?.contiguous(),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.names.contains_key(name)
    }
}

/// The file row that [`unpermute`] puts at row `dst` of `rows` rows over
/// `heads` heads.
fn unpermuted_row(dst: usize, rows: usize, heads: usize) -> candle_core::Result<usize> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("cannot unpermute {rows} rows over {heads} heads");
    }
    let half = rows / heads / 2;
    let (h, rest) = (dst / (2 * half), dst % (2 * half));
    let (j, i) = (rest / half, rest % half);
    Ok(h * 2 * half + i * 2 + j)
}

/// A llama.cpp tensor name turned into its Hugging Face decoder name: the
/// embedding, final norm and output head, and per layer `blk.N.PART.KIND`
/// as `model.layers.N.{layer_part(PART)}.KIND`, with the parts every
/// decoder shares (norms, dense MLP, MoE router and stacked experts)
/// known here and the rest (attention) from `layer_part`.
pub fn hf_name_with(
    gguf: &str,
    layer_part_name: impl Fn(&str) -> Option<&'static str>,
) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let (layer, rest) = layer_part(gguf)?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        // Mixture of experts: the router, and each projection of all
        // experts stacked `[experts, out, in]`.
        "ffn_gate_inp" => "mlp.gate",
        "ffn_gate_exps" => "mlp.experts.gate_proj",
        "ffn_up_exps" => "mlp.experts.up_proj",
        "ffn_down_exps" => "mlp.experts.down_proj",
        other => layer_part_name(other)?,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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
        // The same on rows of bytes, as quantized blocks are rearranged.
        let bytes: Vec<u8> = permuted
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let rows: Vec<u8> = (0..h * d)
            .flat_map(|dst| {
                let src = unpermuted_row(dst, h * d, h).unwrap();
                bytes[src * 4 * inp..(src + 1) * 4 * inp].to_vec()
            })
            .collect();
        let floats: Vec<f32> = rows
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(floats, w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
