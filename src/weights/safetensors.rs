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
        if t.shape() != &s {
            candle_core::bail!(
                "{name}: shape {:?} in the checkpoint, expected {s:?}",
                t.shape()
            );
        }
        Ok(t)
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

/// A `VarBuilder` over the safetensors files of a folder.
pub fn var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<candle_nn::VarBuilder<'static>> {
    let files = SafetensorsFiles::open(paths)?;
    Ok(candle_nn::VarBuilder::from_backend(
        Box::new(files),
        dtype,
        device.clone(),
    ))
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
}
