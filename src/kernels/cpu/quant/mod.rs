//! Matrix multiplies with weights kept in GGUF's block formats, byte for byte
//! as the file stores them (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K):
//! no dequantized copy ever exists, so a model takes the memory its file
//! takes and decoding one token reads a quarter to a half of f16's bytes.
//!
//! Activations are quantized on the fly to 8 bits per value with one f32 scale
//! per 32 (as GGUF's Q8_0), plus the sum of each 16 values for the formats
//! whose blocks carry a minimum. A weight row's dot product with an activation
//! row is then integer multiply-adds per 32 values and one float multiply-add
//! per 32 (per 16 where Q6_K has a scale per 16).
//!
//! Every format has a scalar dot product ([`scalar`]) that is the reference and
//! the fallback, and an AVX2 one ([`avx2`], the 32-value formats also with
//! AVX-512 VNNI's byte dot product where the CPU has it) checked against it.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod quantize;
mod scalar;

pub use quantize::quantize_row;

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::matmul::SharedOut;
use super::{filled_vec, with_slice};

/// Values per activation block (and per sub-block of every weight format).
pub const QK: usize = 32;
/// Values per super-block of the K formats.
pub const QK_K: usize = 256;

/// The GGUF block formats with a native kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    /// The native format for a GGUF tensor type, if there is one.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Bytes per block, as in the file.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one row of `k` values (`k` a multiple of the block size).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
}

/// A `[n, k]` matrix in one block format, rows of whole blocks as in GGUF.
pub struct QMatrix {
    ty: QType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} [{}, {}])", self.ty.name(), self.n, self.k)
    }
}

impl QMatrix {
    /// `data` holds `n` rows of `k` values in `ty`'s blocks.
    pub fn new(ty: QType, n: usize, k: usize, data: Vec<u8>) -> Result<Self> {
        if k == 0 || !k.is_multiple_of(ty.block_values()) {
            candle_core::bail!(
                "{}: a row of {k} values is not a whole number of {}-value blocks",
                ty.name(),
                ty.block_values()
            );
        }
        if data.len() != n * ty.row_bytes(k) {
            candle_core::bail!(
                "{} [{n}, {k}]: expected {} bytes, got {}",
                ty.name(),
                n * ty.row_bytes(k),
                data.len()
            );
        }
        Ok(Self { ty, n, k, data })
    }

    /// `(rows, values per row)`.
    /// A matrix of the rows `rows` of this one, in that order (their
    /// blocks copied as they are).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= self.n) {
            candle_core::bail!("{self:?}: no row {r}");
        }
        let data = rows
            .iter()
            .flat_map(|&r| self.row(r as usize))
            .copied()
            .collect();
        Self::new(self.ty, rows.len(), self.k, data)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The bytes the blocks take.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.k);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Rows `r..r + len`, back to back.
    fn rows(&self, r: usize, len: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.k);
        &self.data[r * rb..(r + len) * rb]
    }

    /// Row `r` dequantized into `out` (`k` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() == self.k, "row {r} of {:?}", self);
        scalar::dequantize_row(self.ty, self.row(r), out);
    }
}

/// Activation rows quantized to 8 bits: one f32 scale per `block` values
/// (32 for the 32-value formats, 256 for the K formats, as llama.cpp's Q8_0
/// and Q8_K) and the integer sum of each 16 (for the formats whose blocks
/// carry a minimum or an offset).
pub struct QActs {
    k: usize,
    block: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum16: Vec<i16>,
}

impl QActs {
    /// `x` holds rows of `k` values; `k` is a multiple of `block` (32 or 256).
    pub fn quantize(x: &[f32], k: usize, block: usize) -> Self {
        assert!(block.is_multiple_of(QK) && k.is_multiple_of(block) && x.len().is_multiple_of(k));
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / block];
        let mut sum16 = vec![0i16; x.len() / 16];
        q.par_chunks_mut(block)
            .zip(d.par_iter_mut())
            .zip(sum16.par_chunks_mut(block / 16))
            .zip(x.par_chunks(block))
            .with_min_len(64)
            .for_each(|(((q, d), s), x)| {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                if amax == 0.0 || !amax.is_finite() {
                    // Non-finite inputs give non-finite outputs, as a float
                    // matmul would.
                    *d = if amax.is_finite() { 0.0 } else { f32::NAN };
                    q.fill(0);
                    s.fill(0);
                    return;
                }
                *d = amax / 127.0;
                let inv = 127.0 / amax;
                // Round to nearest with the 1.5 * 2^23 trick: vectorizes,
                // unlike `f32::round`.
                const MAGIC: f32 = 12_582_912.0;
                for (o, v) in q.iter_mut().zip(x) {
                    *o = ((v * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
                }
                for (s, q) in s.iter_mut().zip(q.chunks_exact(16)) {
                    *s = q.iter().map(|&v| v as i16).sum();
                }
            });
        Self {
            k,
            block,
            q,
            d,
            sum16,
        }
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let k = self.k;
        ActRow {
            q: &self.q[r * k..(r + 1) * k],
            d: &self.d[r * k / self.block..(r + 1) * k / self.block],
            sum16: &self.sum16[r * k / 16..(r + 1) * k / 16],
            block: self.block,
        }
    }

    /// The quantized value at `i` of row `r`, dequantized (for tests).
    #[cfg(test)]
    fn value(&self, r: usize, i: usize) -> f32 {
        let at = r * self.k + i;
        self.q[at] as f32 * self.d[at / self.block]
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub q: &'a [i8],
    /// One scale per `block` values.
    pub d: &'a [f32],
    pub sum16: &'a [i16],
    pub block: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-512 VNNI's byte dot product for the 32-value formats
    /// (Q8_0 on 512-bit registers).
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Self::Avx2Vnni;
            }
            return Self::Avx2;
        }
        Self::Scalar
    }

    /// Every kernel this CPU can run, the reference first (for tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Self::Avx2);
            }
            if Self::detect() == Self::Avx2Vnni {
                v.push(Self::Avx2Vnni);
            }
        }
        v
    }

    /// The dot products of a weight row (whole blocks of `ty`) with up to
    /// four activation rows, into `out` (one value per row).
    ///
    /// # Safety
    /// The caller has checked what [`check_rows`] checks.
    unsafe fn dot_rows(self, ty: QType, w: &[u8], x: &[ActRow], out: &mut [f32]) {
        match self {
            Self::Scalar => {
                for (o, x) in out.iter_mut().zip(x) {
                    *o = scalar::dot(ty, w, *x);
                }
            }
            // SAFETY: `detect` saw AVX2, FMA and F16C; the caller checked
            // the rest.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::dot_rows(ty, w, x, out) },
            // SAFETY: `detect` saw AVX-512F, BW, VL and VNNI too.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Vnni => unsafe { avx2::dot_rows_vnni(ty, w, x, out) },
        }
    }

    /// The dot products of `out.len()` consecutive weight rows (`w`, back
    /// to back, whole blocks of `ty` each) with one activation row.
    ///
    /// # Safety
    /// The caller has checked what [`check_rows`] checks for `x` against
    /// one row of `w`.
    unsafe fn dot_run(self, ty: QType, w: &[u8], x: &ActRow, out: &mut [f32]) {
        match self {
            Self::Scalar => {
                let row_bytes = w.len() / out.len();
                for (o, w) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
                    *o = scalar::dot(ty, w, *x);
                }
            }
            // SAFETY: as in `dot_rows`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::dot_run(ty, w, x, out) },
            // SAFETY: as in `dot_rows`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Vnni => unsafe { avx2::dot_run_vnni(ty, w, x, out) },
        }
    }

    /// Whether [`Kernel::dot_tile`] takes four weight rows of `ty` at once
    /// with `m` activation rows (the AVX2 K-format tile, as
    /// `avx2::tiles` decides).
    fn tiles(self, ty: QType, m: usize) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::tiles(ty, m),
            _ => false,
        }
    }

    /// The dot products of four weight rows with up to [`TILE_ACTS`]
    /// activation rows: `out[r][i]` for weight row `i` and activation row
    /// `r`.
    ///
    /// # Safety
    /// `self.tiles(ty, _)`; the caller has checked what [`check_rows`]
    /// checks for each activation row against `w`'s rows, which hold the
    /// same number of blocks; `1 <= x.len() == out.len() <= TILE_ACTS`.
    unsafe fn dot_tile(
        self,
        ty: QType,
        w: [&[u8]; TILE_ROWS],
        x: &[ActRow],
        out: &mut [[f32; TILE_ROWS]],
    ) {
        match self {
            // SAFETY: `tiles` is true only for `Avx2`, which `detect` chose
            // on seeing AVX2, FMA and F16C; the caller checked the rest.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::dot_tile(ty, w, x, out) },
            _ => unreachable!("no tile kernel"),
        }
    }

    /// Activation rows one [`Kernel::dot_rows`] call takes for `ty`.
    fn max_rows(self, ty: QType) -> usize {
        match self {
            Self::Scalar => 4,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::max_rows(ty),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Vnni => avx2::max_rows_vnni(ty),
        }
    }
}

/// What the kernels rely on: 1-8 activation rows quantized in blocks of
/// the weight format's own size (32, or 256 for the K formats), each as long
/// as the weight row `w` (whole blocks).
fn check_rows(ty: QType, w: &[u8], x: &[ActRow]) -> bool {
    (1..=8).contains(&x.len())
        && x.iter().all(|x| {
            x.block == ty.block_values()
                && w.len() == ty.row_bytes(x.q.len())
                && x.d.len() * x.block == x.q.len()
                && x.sum16.len() * 16 == x.q.len()
        })
}

/// Weight rows one [`Kernel::dot_tile`] call takes.
const TILE_ROWS: usize = 4;

/// Activation rows one [`Kernel::dot_tile`] call takes at most: each
/// super-block of its four weight rows is unpacked once for all of them,
/// and their share of a super-block (64 x 256 bytes) stays in L1.
const TILE_ACTS: usize = 64;

/// Weight rows per [`Kernel::dot_run`] call.
const RUN_ROWS: usize = 64;

/// Activation rows per pass over a task's weight rows.
const ACT_ROWS: usize = 16;

/// Weight rows per parallel task: enough work per task to amortize
/// scheduling, enough tasks to keep every core busy.
fn rows_per_task(n: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_balance = n.div_ceil(threads * 8).max(1);
    // Fewer rows when many activation rows make each row expensive.
    let by_work = (4096 / m.max(1)).clamp(1, 64);
    by_balance.min(by_work).max(1)
}

/// `x · [W₀; W₁; …]ᵀ`: the outputs of several matrices with the same input
/// width side by side (fused q/k/v or gate/up projections whose parts may be
/// stored in different formats). `x` is `[m, k]` f32; returns `[m, Σ nᵢ]`.
pub fn matmul(parts: &[&QMatrix], x: &Tensor) -> Result<Tensor> {
    matmul_with(Kernel::detect(), parts, x)
}

fn matmul_with(kernel: Kernel, parts: &[&QMatrix], x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (m, k) = x.dims2()?;
    if parts.is_empty() {
        candle_core::bail!("quantized matmul without weights");
    }
    if let Some(p) = parts.iter().find(|p| p.k != k) {
        candle_core::bail!("matmul: input width {k}, weight {:?} expects {}", p, p.k);
    }
    let n: usize = parts.iter().map(|p| p.n).sum();
    // One quantization of the input per activation block size the parts need.
    let (mut acts32, mut acts256) = (None, None);
    with_slice::<f32, _>(&x, |xv| {
        for p in parts {
            let slot = match p.ty.block_values() {
                QK => &mut acts32,
                _ => &mut acts256,
            };
            if slot.is_none() {
                *slot = Some(QActs::quantize(xv, k, p.ty.block_values()));
            }
        }
    })?;
    fn rows(a: &Option<QActs>, m: usize) -> Vec<ActRow<'_>> {
        a.as_ref()
            .map_or(Vec::new(), |a| (0..m).map(|j| a.row(j)).collect())
    }
    let (rows32, rows256) = (rows(&acts32, m), rows(&acts256, m));
    let rows_for = |ty: QType| match ty.block_values() {
        QK => &rows32,
        _ => &rows256,
    };
    // What the kernels rely on, checked once per matrix rather than per row.
    for p in parts.iter().filter(|p| p.n > 0) {
        let step = kernel.max_rows(p.ty);
        for j in (0..m).step_by(step) {
            let h = (m - j).min(step);
            assert!(check_rows(p.ty, p.row(0), &rows_for(p.ty)[j..j + h]));
        }
    }
    // The first output row of each part.
    let starts: Vec<usize> = parts
        .iter()
        .scan(0, |s, p| {
            let at = *s;
            *s += p.n;
            Some(at)
        })
        .collect();
    let mut chunk = rows_per_task(n, m);
    if parts.iter().any(|p| kernel.tiles(p.ty, m)) {
        chunk = chunk.next_multiple_of(TILE_ROWS);
    }
    // Each task owns a range of weight rows, that is a range of columns of
    // the `[m, n]` output, and writes them straight there: `m` short runs,
    // disjoint from every other task's. (Written as `[n, m]` and transposed
    // afterwards, the transpose cost 6% of a 32-stream decode step of a 1B
    // model: its LM head's output alone is 16 MB.)
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        let y = SharedOut(y.as_mut_ptr().cast::<f32>());
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let (first, len) = (c * chunk, chunk.min(n - c * chunk));
            // SAFETY: `j < m` and `first + i < n`: inside the output, and in
            // this task's columns only.
            let put = |j: usize, i: usize, v: f32| unsafe { y.at(j * n + first + i).write(v) };
            // Activation rows in groups that stay in L1 while the task's
            // weight rows (in L2) pass by.
            let mut buf = [0f32; 8];
            let mut tile = [[0f32; TILE_ROWS]; TILE_ACTS];
            let mut run = [0f32; RUN_ROWS];
            for j0 in (0..m).step_by(ACT_ROWS) {
                let j1 = (j0 + ACT_ROWS).min(m);
                // The task's rows part by part: what depends on the part is
                // looked up once per part, not per row (at one activation row
                // the per-row bookkeeping was 9% of a decode step).
                let (mut row, end) = (first, first + len);
                while row < end {
                    let pi = starts.partition_point(|&s| s <= row) - 1;
                    let p = parts[pi];
                    let part_end = (starts[pi] + p.n).min(end);
                    let rows = rows_for(p.ty);
                    let (tiles, step) = (kernel.tiles(p.ty, m), kernel.max_rows(p.ty));
                    if m == 1 {
                        // Decoding one sequence: runs of rows per kernel call.
                        while row < part_end {
                            let len = (part_end - row).min(RUN_ROWS);
                            let w = p.rows(row - starts[pi], len);
                            // SAFETY: checked above (all of a part's rows
                            // have one length).
                            unsafe { kernel.dot_run(p.ty, w, &rows[0], &mut run[..len]) };
                            for (t, &v) in run[..len].iter().enumerate() {
                                put(0, row - first + t, v);
                            }
                            row += len;
                        }
                        continue;
                    }
                    while row < part_end {
                        let (i, r) = (row - first, row - starts[pi]);
                        if tiles && row + TILE_ROWS <= part_end {
                            // A tile takes every activation row, in the
                            // first pass: it unpacks each super-block of its
                            // weight rows once per call.
                            if j0 > 0 {
                                row += TILE_ROWS;
                                continue;
                            }
                            let w = std::array::from_fn(|t| p.row(r + t));
                            for j in (0..m).step_by(TILE_ACTS) {
                                let h = (m - j).min(TILE_ACTS);
                                // SAFETY: every activation row was checked
                                // above against this part's row length.
                                unsafe {
                                    kernel.dot_tile(p.ty, w, &rows[j..j + h], &mut tile[..h])
                                };
                                for (jj, t) in tile[..h].iter().enumerate() {
                                    for (ti, &v) in t.iter().enumerate() {
                                        put(j + jj, i + ti, v);
                                    }
                                }
                            }
                            row += TILE_ROWS;
                            continue;
                        }
                        let w = p.row(r);
                        // Several activation rows per pass: each weight
                        // block is unpacked once for all of them.
                        for j in (j0..j1).step_by(step) {
                            let h = (j1 - j).min(step);
                            // SAFETY: checked above for every row group
                            // (all weight rows of a part have one length).
                            unsafe { kernel.dot_rows(p.ty, w, &rows[j..j + h], &mut buf[..h]) };
                            for (jj, &v) in buf[..h].iter().enumerate() {
                                put(j + jj, i, v);
                            }
                        }
                        row += 1;
                    }
                }
            }
        })
    };
    // SAFETY: the tasks' columns cover all `n` columns of all `m` rows.
    let y = unsafe { filled_vec(m * n, fill) };
    Tensor::from_vec(y, (m, n), x.device())
}

#[cfg(test)]
mod tests;
