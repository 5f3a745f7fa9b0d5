//! Safetensors files read one tensor at a time with positioned reads.
//!
//! Memory-mapping the files (candle's `from_mmaped_safetensors`) counts every
//! page the load touches as the process's own resident memory until the map
//! goes away: loading a 2.5 GB bfloat16 model quantized to 1.2 GB peaked at
//! 4.5 GB. Reading each tensor into a buffer that lives only while it is
//! converted keeps the peak at the model as it ends up plus one tensor; the
//! file's pages stay in the page cache, where the kernel can drop them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{QuantSource, Weights};
use crate::kernels::cpu::matmul_q8::Q8Matrix;
use crate::kernels::cpu::quant::{self, QMatrix, QType, QK_K};
use crate::layers::Quantization;

/// Bytes read at a time when a 16-bit tensor is widened to f32.
const CHUNK: usize = 4 << 20;

/// Where one tensor's bytes are.
struct Entry {
    file: Arc<(File, PathBuf)>,
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
    len: usize,
}

/// The tensors of one or more safetensors files, by name.
pub struct SafetensorsFiles {
    tensors: HashMap<String, Entry>,
}

impl SafetensorsFiles {
    /// Reads the headers of `paths` (every tensor's dtype, shape and place).
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let file = Arc::new((file, path.clone()));
            for (name, entry) in read_header(&file)? {
                if tensors.insert(name.clone(), entry).is_some() {
                    bail!("{name} is in more than one safetensors file");
                }
            }
        }
        Ok(Self { tensors })
    }

    /// Bytes of all tensors.
    pub fn tensor_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.len).sum()
    }
}

fn read_header(file: &Arc<(File, PathBuf)>) -> anyhow::Result<Vec<(String, Entry)>> {
    let (f, path) = (&file.0, &file.1);
    let size = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact_at(&mut n, 0)
        .with_context(|| format!("{}: too short for safetensors", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{}: header length {n} does not fit the file",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact_at(&mut header, 8)?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: the header is not JSON", path.display()))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = || format!("{}: tensor {name}: malformed header entry", path.display());
        let dtype = v["dtype"].as_str().with_context(bad)?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .with_context(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .with_context(bad)?;
        let offsets = v["data_offsets"].as_array().with_context(bad)?;
        let (begin, end) = match offsets.as_slice() {
            [a, b] => (a.as_u64().with_context(bad)?, b.as_u64().with_context(bad)?),
            _ => bail!(bad()),
        };
        let dtype = match dtype {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => bail!(
                "{}: tensor {name}: unsupported dtype {other}",
                path.display()
            ),
        };
        let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end < begin || (end - begin) as usize != len || data_start + end > size {
            bail!(
                "{}: tensor {name}: {len} bytes of {dtype:?} {shape:?} do not match its offsets {begin}..{end}",
                path.display()
            );
        }
        out.push((
            name,
            Entry {
                file: file.clone(),
                dtype,
                shape,
                offset: data_start + begin,
                len,
            },
        ));
    }
    Ok(out)
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        super::expect_shape(t, &s, name, "the checkpoint")
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            candle_core::bail!("cannot find tensor {name} in the safetensors files");
        };
        let read = |buf: &mut [u8], at: usize| {
            e.file
                .0
                .read_exact_at(buf, e.offset + at as u64)
                .map_err(|err| {
                    candle_core::Error::Msg(format!(
                        "{}: reading {name}: {err}",
                        e.file.1.display()
                    ))
                })
        };
        if dtype == DType::F32 && matches!(e.dtype, DType::BF16 | DType::F16) {
            // Widened a chunk at a time into the final buffer: no 16-bit
            // copy of the whole tensor next to the f32 one.
            let n = e.len / 2;
            let mut out = vec![0f32; n];
            let mut chunk = vec![0u8; CHUNK.min(e.len)];
            for (i, o) in out.chunks_mut(CHUNK / 2).enumerate() {
                let bytes = &mut chunk[..2 * o.len()];
                read(bytes, i * CHUNK)?;
                let halves = bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]));
                if e.dtype == DType::BF16 {
                    for (o, h) in o.iter_mut().zip(halves) {
                        *o = f32::from_bits((h as u32) << 16);
                    }
                } else {
                    for (o, h) in o.iter_mut().zip(halves) {
                        *o = half::f16::from_bits(h).to_f32();
                    }
                }
            }
            return Tensor::from_vec(out, e.shape.as_slice(), dev);
        }
        let mut buf = vec![0u8; e.len];
        read(&mut buf, 0)?;
        Tensor::from_raw_buffer(&buf, e.dtype, &e.shape, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// The [`SafetensorsFiles`] shared by the `VarBuilder` and the quantizer.
struct Shared(Arc<SafetensorsFiles>);

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// The weights of a folder of safetensors. Under `--quantization`, the
/// matrices come as GGUF blocks quantized straight from the file a few rows
/// at a time ([`QuantizeOnLoad`]), so no float copy of a whole matrix
/// exists (the largest, the vocabulary table, is 1-2 GiB in f32).
/// `rows_are_outputs`: the checkpoint stores linear weights as `[out, in]`
/// (everything but GPT-2's `Conv1D`).
pub fn weights(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
    quantization: Quantization,
    rows_are_outputs: bool,
) -> anyhow::Result<Weights<'static>> {
    let files = Arc::new(SafetensorsFiles::open(paths)?);
    let vb =
        candle_nn::VarBuilder::from_backend(Box::new(Shared(files.clone())), dtype, device.clone());
    let quant: Option<Arc<dyn QuantSource>> = match quantization {
        Quantization::None => None,
        _ if !rows_are_outputs => None,
        q => Some(Arc::new(QuantizeOnLoad { files, quant: q })),
    };
    Ok(Weights::new(vb, quant))
}

/// Quantizes 2-D float tensors into GGUF blocks as they are asked for.
struct QuantizeOnLoad {
    files: Arc<SafetensorsFiles>,
    quant: Quantization,
}

impl QuantizeOnLoad {
    /// The block format for matrix `name` of rows of `k` values, if any:
    /// vocabulary tables (embedding, output head) take Q8_0 whatever the
    /// layers take, as llama.cpp's mixes keep them wider; q8_0 layers on a
    /// CPU with AVX-512 VNNI are left to its own Q8 kernel (`Linear::new`).
    fn format(&self, name: &str, k: usize) -> Option<QType> {
        let vocab = name.contains("embed") || name.contains("lm_head") || name.contains("wte");
        let q8 = k.is_multiple_of(32).then_some(QType::Q8_0);
        if vocab {
            return q8;
        }
        match self.quant {
            Quantization::Q4K if k.is_multiple_of(QK_K) => Some(QType::Q4K),
            Quantization::Q4K => q8,
            Quantization::Q8_0 if Q8Matrix::has_simd() => None,
            _ => q8,
        }
    }
}

impl QuantSource for QuantizeOnLoad {
    fn quantized(&self, name: &str) -> Option<candle_core::Result<Arc<QMatrix>>> {
        let e = self.files.tensors.get(name)?;
        let [n, k] = e.shape[..] else {
            return None;
        };
        if !matches!(e.dtype, DType::F32 | DType::F16 | DType::BF16) || n == 0 {
            return None;
        }
        let ty = self.format(name, k)?;
        Some(quantize_from_file(e, name, n, k, ty).map(Arc::new))
    }
}

/// Rows of `e` read, widened and quantized a chunk at a time.
fn quantize_from_file(
    e: &Entry,
    name: &str,
    n: usize,
    k: usize,
    ty: QType,
) -> candle_core::Result<QMatrix> {
    use rayon::prelude::*;
    let (rb, esize) = (ty.row_bytes(k), e.dtype.size_in_bytes());
    let rows_per_chunk = (CHUNK / (k * esize)).max(1);
    let mut data = vec![0u8; n * rb];
    let mut raw = vec![0u8; rows_per_chunk * k * esize];
    let mut wide = vec![0f32; rows_per_chunk * k];
    for (c, out) in data.chunks_mut(rows_per_chunk * rb).enumerate() {
        let rows = out.len() / rb;
        let raw = &mut raw[..rows * k * esize];
        e.file
            .0
            .read_exact_at(raw, e.offset + (c * rows_per_chunk * k * esize) as u64)
            .map_err(|err| {
                candle_core::Error::Msg(format!("{}: reading {name}: {err}", e.file.1.display()))
            })?;
        let wide = &mut wide[..rows * k];
        widen(e.dtype, raw, wide);
        out.par_chunks_mut(rb)
            .zip(wide.par_chunks(k))
            .for_each(|(q, row)| quant::quantize_row(ty, row, q));
    }
    QMatrix::new(ty, n, k, data)
}

/// Little-endian `dtype` values (f32, f16 or bf16) as f32.
fn widen(dtype: DType, raw: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_16_bit_tensors_as_f32_and_refuses_bad_headers() {
        let dir = std::env::temp_dir().join(format!("candela-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vals = [1.5f32, -2.0, 0.25, 3.0, -0.5, 8.0];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F16","shape":[3,2],"data_offsets":[12,24]}}"#;
        let good = write(&dir, "good.safetensors", header, &[bf, f16].concat());
        let st = SafetensorsFiles::open(&[good]).unwrap();
        assert_eq!(st.tensor_bytes(), 24);
        let dev = Device::Cpu;
        let a = st.get_unchecked("a", DType::F32, &dev).unwrap();
        assert_eq!(a.dims(), &[2, 3]);
        assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
        let b = st.get_unchecked("b", DType::F32, &dev).unwrap();
        assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vals);
        let b16 = st.get_unchecked("b", DType::BF16, &dev).unwrap();
        assert_eq!(b16.dtype(), DType::BF16);
        assert!(st.get_unchecked("c", DType::F32, &dev).is_err());

        // Offsets that disagree with the shape, or run past the file.
        for (i, h) in [
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}}"#,
            r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,8]}}"#,
            "not json",
        ]
        .iter()
        .enumerate()
        {
            let p = write(&dir, &format!("bad{i}.safetensors"), h, &[0u8; 8]);
            assert!(SafetensorsFiles::open(&[p]).is_err(), "{h}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn matrices_quantized_from_the_file_equal_the_dense_path() {
        // 4,200 rows of 256 f32 values span two 4 MiB read chunks; the bf16
        // matrix and the vocabulary-named one take the other branches.
        let dir = std::env::temp_dir().join(format!("candela-stq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (n, k) = (4200, 256);
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0 + (i / k) as f32 * 1e-3)
            .collect();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf_bytes: Vec<u8> = vals[..64 * k]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let (a, b) = (f32_bytes.len(), bf_bytes.len());
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{n},{k}],"data_offsets":[0,{a}]}},"h":{{"dtype":"BF16","shape":[64,{k}],"data_offsets":[{a},{}]}},"model.embed_tokens.weight":{{"dtype":"BF16","shape":[64,{k}],"data_offsets":[{a},{}]}}}}"#,
            a + b,
            a + b
        );
        let path = write(
            &dir,
            "m.safetensors",
            &header,
            &[f32_bytes, bf_bytes].concat(),
        );
        let dev = Device::Cpu;
        for quant in [Quantization::Q4K, Quantization::Q8_0] {
            let w = weights(std::slice::from_ref(&path), DType::F32, &dev, quant, true).unwrap();
            for (name, rows, ty) in [
                ("w", n, QType::Q4K),
                ("h", 64, QType::Q4K),
                ("model.embed_tokens.weight", 64, QType::Q8_0),
            ] {
                let ty = if quant == Quantization::Q8_0 {
                    QType::Q8_0
                } else {
                    ty
                };
                let Some(got) = w.quantized(name) else {
                    // q8_0 on a VNNI CPU is left to the dense path.
                    assert!(quant == Quantization::Q8_0 && Q8Matrix::has_simd());
                    continue;
                };
                let got = got.unwrap();
                let dense = w.get((rows, k), name).unwrap();
                let want = crate::layers::linear::quantize_blocks(&dense, ty).unwrap();
                assert_eq!(got.dims(), (rows, k));
                let (mut g, mut e) = (vec![0f32; k], vec![0f32; k]);
                for r in [0, 1, rows / 2, rows - 1] {
                    got.dequantize_row(r, &mut g);
                    want.dequantize_row(r, &mut e);
                    assert_eq!(g, e, "{name} {quant:?} row {r}");
                }
            }
        }
        // No quantization, or GPT-2's [in, out] Conv1D layout: dense only.
        for (quant, rows_are_outputs) in [(Quantization::None, true), (Quantization::Q4K, false)] {
            let w = weights(
                std::slice::from_ref(&path),
                DType::F32,
                &dev,
                quant,
                rows_are_outputs,
            )
            .unwrap();
            assert!(w.quantized("w").is_none());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
