//! f32 `y = x · Wᵀ (+ b)` against a weight packed once, at load time.
//!
//! candle's GEMM packs the weight on every call, which for the row counts of a
//! decode step (1 to a few dozen sequences) costs about as much as the
//! arithmetic. Here the weight is stored as panels of 16 output columns, each
//! panel `[k][16]` contiguous and 64-byte aligned: one AVX-512 register per
//! input index. A micro-tile multiplies up to [`MR`] rows of `x` by two panels
//! (32 columns) with 16 accumulators that never leave registers, so every
//! weight byte is read once per block of rows: at one row this streams the
//! weight at memory bandwidth, at many rows it runs at FMA throughput.
//!
//! Work is split over rayon by blocks of rows and groups of panels; each task
//! writes a disjoint rectangle of the output.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::cpu::with_slice;

/// f32 lanes in a panel: one AVX-512 register.
const LANES: usize = 16;
/// Panels in a micro-tile.
const NR: usize = 2;
/// Rows in a micro-tile: with [`NR`] panels, 16 accumulators out of 32 registers.
const MR: usize = 8;
/// Rows of `x` per cache block (256 rows of a 1536-wide input are 1.5 MiB: L2).
const MC: usize = 256;
/// Inputs per pass over a tile: two panels of 256 lanes are 32 KiB, inside L1.
const KC: usize = 256;
/// Micro-tiles per task, at least: below this, rayon's hand-off costs more than it saves.
const MIN_TILES_PER_TASK: usize = 2;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lane([f32; LANES]);

/// A `[n, k]` weight (a linear layer's `[out, in]`) packed for [`PackedMatrix::forward`].
pub struct PackedMatrix {
    k: usize,
    n: usize,
    /// Panel `p` holds columns `16p..16p+16` of `Wᵀ`: `data[p * k + i].0[l] = W[16p + l, i]`,
    /// zero past `n`. The panel count is rounded up to a multiple of [`NR`].
    data: Vec<Lane>,
    /// The bias, zero-padded to the panels' width.
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("k", &self.k)
            .field("n", &self.n)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl PackedMatrix {
    /// Packs `weight` (`[n, k]`, f32) and an optional bias (`[n]`).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = weight.contiguous()?;
        let panels = n.div_ceil(LANES * NR) * NR;
        let mut data = vec![Lane([0.0; LANES]); panels * k];
        with_slice::<f32, _>(&weight, |w| {
            data.par_chunks_mut(k).enumerate().for_each(|(p, panel)| {
                for l in 0..LANES {
                    let col = p * LANES + l;
                    if col >= n {
                        break;
                    }
                    let row = &w[col * k..(col + 1) * k];
                    for (dst, &v) in panel.iter_mut().zip(row) {
                        dst.0[l] = v;
                    }
                }
            })
        })?;
        let bias = bias
            .map(|b| padded_bias(b, n, panels * LANES))
            .transpose()?;
        Ok(Self { k, n, data, bias })
    }

    /// `x · Wᵀ + b` for `x` of shape `[m, k]` (f32); returns `[m, n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("matmul: input width {k}, weight expects {}", self.k);
        }
        let mut y = vec![0f32; m * self.n];
        with_slice::<f32, _>(&x, |xv| self.compute(xv, m, &mut y))?;
        Tensor::from_vec(y, (m, self.n), x.device())
    }

    fn compute(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let out = SharedOut(y.as_mut_ptr());
        let kernel = Kernel::detect();
        let tiles_n = self.data.len() / self.k / NR;
        par_tiles(m, tiles_n, MR, |rows, t| {
            // SAFETY: `par_tiles` hands out disjoint (rows, tile) rectangles.
            unsafe { self.column(kernel, x, rows, t, out) }
        });
    }
}

/// Runs `f(rows, tile)` over every block of at most [`MC`] rows and every
/// tile of output columns, on rayon: enough tasks for every thread (and some
/// slack for imbalance), but never so many that a task is a handful of
/// micro-tiles of `mr` rows. Every (rows, tile) pair is visited exactly once.
pub(super) fn par_tiles(
    m: usize,
    tiles_n: usize,
    mr: usize,
    f: impl Fn(std::ops::Range<usize>, usize) + Sync,
) {
    let row_blocks = m.div_ceil(MC);
    let rows_tiles = m.min(MC).div_ceil(mr);
    let want = rayon::current_num_threads() * 4;
    let per_task = tiles_n
        .div_ceil(want.div_ceil(row_blocks))
        .max(MIN_TILES_PER_TASK.div_ceil(rows_tiles))
        .max(1);
    let col_tasks = tiles_n.div_ceil(per_task);
    (0..row_blocks * col_tasks)
        .into_par_iter()
        .for_each(|task| {
            let (rb, ct) = (task / col_tasks, task % col_tasks);
            let rows = rb * MC..((rb + 1) * MC).min(m);
            for t in ct * per_task..((ct + 1) * per_task).min(tiles_n) {
                f(rows.clone(), t);
            }
        });
}

impl PackedMatrix {
    /// Rows `rows` of the output columns of tile `t` (`NR` panels), in chunks
    /// of [`KC`] inputs so that the panels' chunk stays in L1 across row tiles.
    ///
    /// # Safety
    /// `x` holds `rows.end` rows of `k`; `out` points to an `[m, n]` output
    /// with `m >= rows.end`; no one else writes this rectangle meanwhile.
    unsafe fn column(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: std::ops::Range<usize>,
        t: usize,
        out: SharedOut,
    ) {
        let c0 = t * NR * LANES;
        let cols = (self.n - c0.min(self.n)).min(NR * LANES);
        if cols == 0 {
            return;
        }
        let panel = &self.data[t * NR * self.k..(t + 1) * NR * self.k];
        let mut k0 = 0;
        while k0 < self.k {
            let k1 = (k0 + KC).min(self.k);
            let init = match (k0, &self.bias) {
                (0, Some(b)) => Init::Bias(&b[c0..c0 + NR * LANES]),
                (0, None) => Init::Zero,
                _ => Init::Out,
            };
            let mut r = rows.start;
            while r < rows.end {
                let h = (rows.end - r).min(MR);
                let tile = Tile {
                    x: &x[r * self.k..(r + h) * self.k],
                    k: self.k,
                    k0,
                    k1,
                    panel,
                    init,
                    // SAFETY: inside the output, per the caller.
                    out: unsafe { out.at(r * self.n + c0) },
                    ldo: self.n,
                    cols,
                };
                // SAFETY: the tile's bounds hold per the caller.
                unsafe { kernel.run(h, &tile) };
                r += h;
            }
            k0 = k1;
        }
    }
}

/// The output pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(pub(super) *mut f32);
// SAFETY: see `compute`: every task writes its own rectangle.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `offset` is inside the output.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// One micro-tile: `h <= MR` rows of `x` times one pair of panels, over the
/// input indices `k0..k1`.
struct Tile<'a> {
    /// `h` rows of `k`.
    x: &'a [f32],
    k: usize,
    k0: usize,
    k1: usize,
    /// `NR` panels of `k` lanes.
    panel: &'a [Lane],
    /// Where the accumulators start: the bias (or zero) on the first chunk of
    /// `k`, the partial sums already in `out` on later ones.
    init: Init<'a>,
    /// Top-left output element of the tile.
    out: *mut f32,
    ldo: usize,
    /// Valid output columns (`<= NR * LANES`); the rest are padding.
    cols: usize,
}

#[derive(Clone, Copy)]
enum Init<'a> {
    Zero,
    Bias(&'a [f32]),
    Out,
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// # Safety
    /// `tile.x` holds `h` rows, `tile.out` has room for `h` rows of `tile.cols`
    /// at stride `tile.ldo`, and the detected CPU features are present.
    unsafe fn run(self, h: usize, tile: &Tile) {
        macro_rules! by_rows {
            ($f:ident) => {
                match h {
                    1 => $f::<1>(tile),
                    2 => $f::<2>(tile),
                    3 => $f::<3>(tile),
                    4 => $f::<4>(tile),
                    5 => $f::<5>(tile),
                    6 => $f::<6>(tile),
                    7 => $f::<7>(tile),
                    _ => $f::<8>(tile),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { by_rows!(tile_avx512) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { by_rows!(tile_avx2) },
            Self::Portable => by_rows!(tile_portable),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let k = t.k;
    let (p0, p1) = t.panel.split_at(k);
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    match t.init {
        Init::Zero => {}
        Init::Bias(b) => {
            for r in 0..R {
                acc0[r] = unsafe { _mm512_loadu_ps(b.as_ptr()) };
                acc1[r] = unsafe { _mm512_loadu_ps(b.as_ptr().add(LANES)) };
            }
        }
        Init::Out => {
            for r in 0..R {
                // SAFETY: as for the stores below.
                unsafe {
                    let out = t.out.add(r * t.ldo);
                    let lo = t.cols.min(LANES);
                    acc0[r] = _mm512_maskz_loadu_ps(mask(lo), out);
                    acc1[r] = _mm512_maskz_loadu_ps(mask(t.cols - lo), out.add(LANES));
                }
            }
        }
    }
    let x = t.x.as_ptr();
    for i in t.k0..t.k1 {
        // SAFETY: lanes are 64-byte aligned; `x` holds R rows of k.
        unsafe {
            let b0 = _mm512_load_ps(p0.as_ptr().add(i).cast());
            let b1 = _mm512_load_ps(p1.as_ptr().add(i).cast());
            for r in 0..R {
                let a = _mm512_set1_ps(*x.add(r * k + i));
                acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY: the row has `cols` valid outputs; masked stores stay inside them.
        unsafe {
            let out = t.out.add(r * t.ldo);
            if t.cols == NR * LANES {
                _mm512_storeu_ps(out, acc0[r]);
                _mm512_storeu_ps(out.add(LANES), acc1[r]);
            } else {
                let lo = t.cols.min(LANES);
                let hi = t.cols - lo;
                _mm512_mask_storeu_ps(out, mask(lo), acc0[r]);
                _mm512_mask_storeu_ps(out.add(LANES), mask(hi), acc1[r]);
            }
        }
    }
}

/// A bias as f32, zero-padded from `n` to `width` outputs.
pub(super) fn padded_bias(bias: &Tensor, n: usize, width: usize) -> Result<Vec<f32>> {
    let mut v = bias.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    if v.len() != n {
        candle_core::bail!("bias of {} for {n} outputs", v.len());
    }
    v.resize(width, 0.0);
    Ok(v)
}

/// The lane mask of the first `n` of 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(super) fn mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(t: &Tile) {
    tile_portable::<R>(t)
}

/// The same tile in plain Rust; fixed-size accumulators let LLVM keep them in
/// vector registers for whatever instruction set the caller enabled.
#[inline(always)]
fn tile_portable<const R: usize>(t: &Tile) {
    let k = t.k;
    let (p0, p1) = t.panel.split_at(k);
    let mut acc = [[[0f32; LANES]; NR]; R];
    let lo = t.cols.min(LANES);
    match t.init {
        Init::Zero => {}
        Init::Bias(b) => {
            for row in acc.iter_mut() {
                row[0].copy_from_slice(&b[..LANES]);
                row[1].copy_from_slice(&b[LANES..2 * LANES]);
            }
        }
        Init::Out => {
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller guarantees `cols` outputs in each row.
                let out = unsafe { std::slice::from_raw_parts(t.out.add(r * t.ldo), t.cols) };
                row[0][..lo].copy_from_slice(&out[..lo]);
                row[1][..t.cols - lo].copy_from_slice(&out[lo..]);
            }
        }
    }
    for i in t.k0..t.k1 {
        let (b0, b1) = (&p0[i].0, &p1[i].0);
        for (r, row) in acc.iter_mut().enumerate() {
            let a = t.x[r * k + i];
            for l in 0..LANES {
                row[0][l] += a * b0[l];
                row[1][l] += a * b1[l];
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees room for `cols` outputs in each row.
        let out = unsafe { std::slice::from_raw_parts_mut(t.out.add(r * t.ldo), t.cols) };
        out[..lo].copy_from_slice(&row[0][..lo]);
        out[lo..].copy_from_slice(&row[1][..t.cols - lo]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(m: usize, k: usize, n: usize, bias: bool, kernel: Kernel) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let packed = PackedMatrix::new(&w, bias.then_some(&b)).unwrap();
        let mut want = x.matmul(&w.t().unwrap()).unwrap();
        if bias {
            want = want.broadcast_add(&b).unwrap();
        }
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut got = vec![f32::NAN; m * n];
        // Drive the chosen kernel directly so every instruction set is covered.
        let out = SharedOut(got.as_mut_ptr());
        for t in 0..packed.data.len() / k / NR {
            unsafe { packed.column(kernel, &xv, 0..m, t, out) };
        }
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // And the parallel entry point with the detected kernel.
        let y = packed.forward(&x).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in want.iter().zip(&y) {
            assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn matches_candle_matmul() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
        }
        for kernel in kernels {
            for (m, k, n, bias) in [
                (1, 576, 1536, false),
                (3, 70, 130, true),
                (9, 64, 1, false),
                (17, 33, 48, true),
                (300, 40, 100, false),
                (20, 700, 40, true),
            ] {
                check(m, k, n, bias, kernel);
            }
        }
    }
}
