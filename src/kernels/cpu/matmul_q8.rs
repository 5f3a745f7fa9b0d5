//! `y = x · Wᵀ (+ b)` with W in 8-bit blocks (GGUF's Q8_0: 32 inputs share an
//! f32 scale) and x quantized the same way on the fly, as llama.cpp does.
//!
//! A quarter of f32's bytes per weight: batch-1 decoding, bound by reading the
//! weights, gets that much faster. With AVX-512 VNNI one `vpdpbusd` does 64
//! multiply-adds of 8-bit integers, so large batches gain too. `vpdpbusd`
//! multiplies unsigned by signed bytes: activations are stored offset by +128
//! and the offset's contribution, 128 · Σ w, is subtracted per block (it is
//! precomputed with the scales).
//!
//! Layout: panels of 16 output columns as in [`super::matmul`]; inside a panel
//! and block, eight 64-byte groups each hold 4 consecutive inputs of the 16
//! columns (`[column][4]`), one register for one `vpdpbusd`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{filled_vec, with_slice};
// Panels of LANES columns, NR per micro-tile, as the f32 kernel: the tile
// helpers are shared.
use super::matmul::{
    padded_bias, par_tiles, row_tiles, store_rows, tile_columns, SharedOut, LANES, NR,
};

/// Rows per micro-tile: 2·MR integer and 2·MR float accumulators, plus weights and scales.
const MR: usize = 4;
/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Groups of four inputs per block.
const GROUPS: usize = BLOCK / 4;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Quads([i8; 64]);

/// A `[n, k]` weight quantized to 8-bit blocks; `k` must be a multiple of [`BLOCK`].
pub struct Q8Matrix {
    k: usize,
    n: usize,
    blocks: usize,
    /// `data[(p * blocks + b) * GROUPS + g].0[c * 4 + j]` = q(W[16p + c, 32b + 4g + j]).
    data: Vec<Quads>,
    /// `scale[(p * blocks + b) * LANES + c]`: the scale of that column's block.
    scale: Vec<f32>,
    /// The same index: `128 · scale · Σ q` over the block.
    corr: Vec<f32>,
    /// Zero-padded to the panels' width.
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("k", &self.k)
            .field("n", &self.n)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

/// Q8_0 quantization of one block: `scale = max |x| / 127`, `q = round(x / scale)`.
fn quantize_block(x: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut q = [0i8; BLOCK];
    if amax == 0.0 || !amax.is_finite() {
        return (0.0, q);
    }
    let scale = amax / 127.0;
    let inv = 1.0 / scale;
    // Round to nearest by adding and removing 1.5 * 2^23 (exact for |v| < 2^22):
    // unlike `f32::round`, a plain add that vectorizes instead of a libm call.
    const MAGIC: f32 = 12_582_912.0;
    for (o, v) in q.iter_mut().zip(x) {
        *o = ((v * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
    }
    (scale, q)
}

/// One activation row as unsigned bytes (quantized + 128) and its block scales.
fn quantize_row(x: &[f32], q: &mut [u8], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { quantize_row_avx512(x, q, s) };
    }
    for ((x, q), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(s) {
        let (sc, qb) = quantize_block(x);
        *s = sc;
        for (o, v) in q.iter_mut().zip(qb) {
            *o = (v as i16 + 128) as u8;
        }
    }
}

/// [`quantize_row`] sixteen lanes at a time, with the same results: the
/// conversion rounds to nearest even as the scalar version's magic add does,
/// and `|x| / scale <= 127` needs no clamp. (The scalar float-to-int casts
/// do not vectorize, and activations are quantized before every matmul.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn quantize_row_avx512(x: &[f32], q: &mut [u8], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let off = _mm512_set1_epi32(128);
    for ((x, q), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(s) {
        // SAFETY: each chunk holds BLOCK = 32 elements.
        unsafe {
            let v = [
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            if amax == 0.0 || !amax.is_finite() {
                *s = 0.0;
                q.fill(128);
                continue;
            }
            *s = amax / 127.0;
            let inv = _mm512_set1_ps(1.0 / *s);
            for (h, v) in v.iter().enumerate() {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(*v, inv)), off);
                _mm_storeu_si128(q.as_mut_ptr().add(16 * h).cast(), _mm512_cvtepi32_epi8(i));
            }
        }
    }
}

impl Q8Matrix {
    /// Whether an input width can be quantized in whole blocks.
    /// Whether this CPU runs the vectorized kernel (AVX-512 VNNI); elsewhere
    /// the portable loops are several times slower than GGUF Q8_0 blocks
    /// with their AVX2 kernel.
    pub fn has_simd() -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(Kernel::detect(), Kernel::Vnni);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn supports(k: usize) -> bool {
        k > 0 && k.is_multiple_of(BLOCK)
    }

    /// Quantizes `weight` (`[n, k]`, f32); the bias stays f32.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if !Self::supports(k) {
            candle_core::bail!("Q8_0 needs an input width that is a multiple of {BLOCK}, got {k}");
        }
        let weight = weight.contiguous()?;
        let blocks = k / BLOCK;
        let panels = n.div_ceil(LANES * NR) * NR;
        let mut data = vec![Quads([0; 64]); panels * blocks * GROUPS];
        let mut scale = vec![0f32; panels * blocks * LANES];
        let mut corr = vec![0f32; panels * blocks * LANES];
        with_slice::<f32, _>(&weight, |w| {
            data.par_chunks_mut(blocks * GROUPS)
                .zip(scale.par_chunks_mut(blocks * LANES))
                .zip(corr.par_chunks_mut(blocks * LANES))
                .enumerate()
                .for_each(|(p, ((d, s), c))| {
                    for l in 0..LANES {
                        let col = p * LANES + l;
                        if col >= n {
                            break;
                        }
                        for b in 0..blocks {
                            let start = col * k + b * BLOCK;
                            let (sc, q) = quantize_block(&w[start..start + BLOCK]);
                            s[b * LANES + l] = sc;
                            let sum: i32 = q.iter().map(|&v| v as i32).sum();
                            c[b * LANES + l] = 128.0 * sc * sum as f32;
                            for (i, &v) in q.iter().enumerate() {
                                d[b * GROUPS + i / 4].0[l * 4 + i % 4] = v;
                            }
                        }
                    }
                })
        })?;
        let bias = bias
            .map(|b| padded_bias(b, n, panels * LANES))
            .transpose()?;
        Ok(Self {
            k,
            n,
            blocks,
            data,
            scale,
            corr,
            bias,
        })
    }

    /// `x · Wᵀ + b` for `x` of shape `[m, k]` (f32); returns `[m, n]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("matmul: input width {k}, weight expects {}", self.k);
        }
        let (xq, xs) = with_slice::<f32, _>(&x, |xv| self.quantize_input(xv, m))?;
        let kernel = Kernel::detect();
        let tiles_n = self.data.len() / (self.blocks * GROUPS) / NR;
        let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
            let out = SharedOut(y.as_mut_ptr().cast());
            par_tiles(m, tiles_n, MR, |rows, t| {
                // SAFETY: `par_tiles` hands out disjoint (rows, tile) rectangles.
                unsafe { self.column(kernel, &xq, &xs, rows, t, out) }
            });
        };
        // SAFETY: the tiles cover every output.
        let y = unsafe { filled_vec(m * self.n, fill) };
        Tensor::from_vec(y, (m, self.n), x.device())
    }

    /// Rows of `x` as unsigned bytes (quantized + 128) and their block scales.
    fn quantize_input(&self, x: &[f32], m: usize) -> (Vec<u8>, Vec<f32>) {
        let (k, blocks) = (self.k, self.blocks);
        let mut xq = vec![0u8; m * k];
        let mut xs = vec![0f32; m * blocks];
        xq.par_chunks_mut(k)
            .zip(xs.par_chunks_mut(blocks))
            .enumerate()
            .with_min_len(16)
            .for_each(|(r, (q, s))| quantize_row(&x[r * k..(r + 1) * k], q, s));
        (xq, xs)
    }

    /// Rows `rows` of the output columns of tile `t` (`NR` panels).
    ///
    /// # Safety
    /// `xq`/`xs` hold `rows.end` quantized rows; `out` points to an `[m, n]`
    /// output with `m >= rows.end`; no one else writes this rectangle meanwhile.
    unsafe fn column(
        &self,
        kernel: Kernel,
        xq: &[u8],
        xs: &[f32],
        rows: std::ops::Range<usize>,
        t: usize,
        out: SharedOut,
    ) {
        let (c0, cols) = tile_columns(t, self.n);
        if cols == 0 {
            return;
        }
        let (k, blocks) = (self.k, self.blocks);
        let panel = |p: usize| {
            (
                &self.data[p * blocks * GROUPS..(p + 1) * blocks * GROUPS],
                &self.scale[p * blocks * LANES..(p + 1) * blocks * LANES],
                &self.corr[p * blocks * LANES..(p + 1) * blocks * LANES],
            )
        };
        let (p0, p1) = (panel(t * NR), panel(t * NR + 1));
        for (r, h) in row_tiles(rows, MR) {
            let tile = Tile {
                xq: &xq[r * k..(r + h) * k],
                xs: &xs[r * blocks..(r + h) * blocks],
                k,
                blocks,
                w: [p0.0, p1.0],
                scale: [p0.1, p1.1],
                corr: [p0.2, p1.2],
                bias: self.bias.as_deref().map(|b| &b[c0..c0 + NR * LANES]),
                // SAFETY: inside the output, per the caller.
                out: unsafe { out.at(r * self.n + c0) },
                ldo: self.n,
                cols,
            };
            // SAFETY: the tile's bounds hold per the caller.
            unsafe { kernel.run(h, &tile) };
        }
    }
}

/// `h <= MR` quantized rows times two panels.
struct Tile<'a> {
    xq: &'a [u8],
    xs: &'a [f32],
    k: usize,
    blocks: usize,
    w: [&'a [Quads]; NR],
    scale: [&'a [f32]; NR],
    corr: [&'a [f32]; NR],
    bias: Option<&'a [f32]>,
    out: *mut f32,
    ldo: usize,
    cols: usize,
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
            return Self::Vnni;
        }
        Self::Portable
    }

    /// # Safety
    /// The tile's slices hold `h` rows and `out` has room for them; the
    /// detected CPU features are present.
    unsafe fn run(self, h: usize, tile: &Tile) {
        macro_rules! by_rows {
            ($f:ident) => {
                match h {
                    1 => $f::<1>(tile),
                    2 => $f::<2>(tile),
                    3 => $f::<3>(tile),
                    _ => $f::<4>(tile),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { by_rows!(tile_vnni) },
            Self::Portable => by_rows!(tile_portable),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(t: &Tile) {
    use super::matmul::{bias_rows_avx512, store_rows_avx512};
    use std::arch::x86_64::*;
    let mut f = match t.bias {
        Some(b) => bias_rows_avx512::<R>(b),
        None => [[_mm512_setzero_ps(); NR]; R],
    };
    let xq = t.xq.as_ptr();
    for b in 0..t.blocks {
        let mut acc = [[_mm512_setzero_si512(); NR]; R];
        for g in 0..GROUPS {
            // SAFETY: the panels hold `blocks * GROUPS` aligned groups and
            // every row `k` bytes; 4 bytes at `32b + 4g` are inside the row.
            unsafe {
                let w0 = _mm512_load_si512(t.w[0].as_ptr().add(b * GROUPS + g).cast());
                let w1 = _mm512_load_si512(t.w[1].as_ptr().add(b * GROUPS + g).cast());
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = xq.add(r * t.k + b * BLOCK + g * 4).cast::<i32>();
                    let x = _mm512_set1_epi32(x.read_unaligned());
                    a[0] = _mm512_dpbusd_epi32(a[0], x, w0);
                    a[1] = _mm512_dpbusd_epi32(a[1], x, w1);
                }
            }
        }
        // SAFETY: scales hold `blocks * LANES` values per panel; `xs` one per row and block.
        unsafe {
            let s = [0, 1].map(|j| _mm512_loadu_ps(t.scale[j].as_ptr().add(b * LANES)));
            let c = [0, 1].map(|j| _mm512_loadu_ps(t.corr[j].as_ptr().add(b * LANES)));
            for (r, (row, a)) in f.iter_mut().zip(&acc).enumerate() {
                let xs = _mm512_set1_ps(*t.xs.get_unchecked(r * t.blocks + b));
                for j in 0..NR {
                    let dot = _mm512_fmsub_ps(_mm512_cvtepi32_ps(a[j]), s[j], c[j]);
                    row[j] = _mm512_fmadd_ps(dot, xs, row[j]);
                }
            }
        }
    }
    // SAFETY: the caller guarantees room for the tile.
    unsafe { store_rows_avx512(t.out, t.ldo, t.cols, &f) };
}

/// The same arithmetic in plain Rust, for CPUs without AVX-512 VNNI.
fn tile_portable<const R: usize>(t: &Tile) {
    let mut f = [[0f32; NR * LANES]; R];
    if let Some(b) = t.bias {
        for row in f.iter_mut() {
            row.copy_from_slice(b);
        }
    }
    for b in 0..t.blocks {
        for (r, row) in f.iter_mut().enumerate() {
            let xq = &t.xq[r * t.k + b * BLOCK..r * t.k + (b + 1) * BLOCK];
            let xs = t.xs[r * t.blocks + b];
            for j in 0..NR {
                for c in 0..LANES {
                    let mut dot = 0i32;
                    for g in 0..GROUPS {
                        let w = &t.w[j][b * GROUPS + g].0[c * 4..c * 4 + 4];
                        for (x, &w) in xq[g * 4..g * 4 + 4].iter().zip(w) {
                            dot += *x as i32 * w as i32;
                        }
                    }
                    let i = b * LANES + c;
                    row[j * LANES + c] += (dot as f32 * t.scale[j][i] - t.corr[j][i]) * xs;
                }
            }
        }
    }
    // SAFETY: the caller guarantees room for the tile.
    unsafe { store_rows(t.out, t.ldo, t.cols, &f) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Dequantizes what `quantize_block` makes of each block of `v`'s rows.
    fn dequantized(v: &[f32]) -> Vec<f32> {
        v.chunks(BLOCK)
            .flat_map(|b| {
                let (s, q) = quantize_block(b);
                q.map(|q| s * q as f32)
            })
            .collect()
    }

    /// Exactly (up to f32 rounding) the matmul of the dequantized weights and
    /// inputs, and within quantization error of the f32 matmul.
    fn check(m: usize, k: usize, n: usize, bias: bool, kernel: Kernel) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let q = Q8Matrix::new(&w, bias.then_some(&b)).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let product = |x: &[f32], w: &[f32]| {
            let x = Tensor::from_slice(x, (m, k), &dev).unwrap();
            let w = Tensor::from_slice(w, (n, k), &dev).unwrap();
            let mut y = x.matmul(&w.t().unwrap()).unwrap();
            if bias {
                y = y.broadcast_add(&b).unwrap();
            }
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let exact = product(&dequantized(&xv), &dequantized(&wv));
        let f32_result = product(&xv, &wv);
        let (xq, xs) = q.quantize_input(&xv, m);
        let mut got = vec![f32::NAN; m * n];
        let out = SharedOut(got.as_mut_ptr());
        for t in 0..q.data.len() / (q.blocks * GROUPS) / NR {
            unsafe { q.column(kernel, &xq, &xs, 0..m, t, out) };
        }
        let via_forward = q.forward(&x).unwrap().flatten_all().unwrap();
        let via_forward = via_forward.to_vec1::<f32>().unwrap();
        // Outputs are sums of k products of unit normals: scale sqrt(k).
        let scale = (k as f32).sqrt();
        for i in 0..m * n {
            let at = format!("{m}x{k}x{n} [{i}]");
            assert!(
                (exact[i] - got[i]).abs() < 1e-4 * scale,
                "{at}: {} vs {}",
                exact[i],
                got[i]
            );
            assert!(
                (f32_result[i] - got[i]).abs() < 0.05 * scale,
                "{at}: {} vs {}",
                f32_result[i],
                got[i]
            );
            assert!(
                (via_forward[i] - got[i]).abs() < 1e-4 * scale,
                "{at}: forward differs"
            );
        }
    }

    #[test]
    fn matches_f32_matmul_within_quantization_error() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
            kernels.push(Kernel::Vnni);
        }
        for kernel in kernels {
            for (m, k, n, bias) in [
                (1, 576, 1536, false),
                (3, 64, 130, true),
                (9, 32, 1, false),
                (17, 96, 48, true),
                (300, 64, 100, false),
            ] {
                check(m, k, n, bias, kernel);
            }
        }
    }

    #[test]
    fn vector_row_quantization_matches_scalar() {
        let k = 32 * 7;
        let mut x: Vec<f32> = (0..k)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        // Ties at .5 after scaling, an all-zero block and an infinite one.
        x[..32].fill(0.5);
        x[5] = 127.0;
        x[3] = 2.5;
        x[32..64].fill(0.0);
        x[70] = f32::INFINITY;
        let (mut q1, mut s1) = (vec![0u8; k], vec![0f32; k / 32]);
        let (mut q2, mut s2) = (vec![0u8; k], vec![0f32; k / 32]);
        for ((x, q), s) in x
            .chunks_exact(BLOCK)
            .zip(q1.chunks_exact_mut(BLOCK))
            .zip(&mut s1)
        {
            let (sc, qb) = quantize_block(x);
            *s = sc;
            for (o, v) in q.iter_mut().zip(qb) {
                *o = (v as i16 + 128) as u8;
            }
        }
        quantize_row(&x, &mut q2, &mut s2);
        assert_eq!(s1, s2);
        assert_eq!(q1, q2);
    }

    #[test]
    fn q8_0_round_trips_already_quantized_weights() {
        // Weights that came from a Q8_0 GGUF (scale · q) quantize back to themselves.
        let q: Vec<f32> = (0..64)
            .map(|i| {
                if i % BLOCK == 0 {
                    -127.0
                } else {
                    ((i * 37) % 255) as f32 - 127.0
                }
            })
            .collect();
        let x: Vec<f32> = q.iter().map(|v| v * 0.0123).collect();
        for block in x.chunks(BLOCK) {
            let (s, qb) = quantize_block(block);
            for (v, q) in block.iter().zip(qb) {
                assert!(
                    (v - s * q as f32).abs() <= 1e-6 * v.abs().max(1.0),
                    "{v} vs {}",
                    s * q as f32
                );
            }
        }
    }
}
