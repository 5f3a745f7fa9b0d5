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

use super::{filled_vec, with_slice};

/// f32 lanes in a panel: one AVX-512 register.
pub(super) const LANES: usize = 16;
/// Panels in a micro-tile.
pub(super) const NR: usize = 2;
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
        let y = with_slice::<f32, _>(&x, |xv| {
            // SAFETY: the tiles cover every output (the first K chunk stores, later ones add).
            unsafe {
                filled_vec::<f32>(m * self.n, |y| {
                    self.compute(xv, m, SharedOut(y.as_mut_ptr().cast()))
                })
            }
        })?;
        Tensor::from_vec(y, (m, self.n), x.device())
    }

    fn compute(&self, x: &[f32], m: usize, out: SharedOut) {
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
    if m == 0 || tiles_n == 0 {
        return; // e.g. the output head of a step in which no sequence samples
    }
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
        let (c0, cols) = tile_columns(t, self.n);
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
            for (r, h) in row_tiles(rows.clone(), MR) {
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
    let mut acc = match t.init {
        Init::Zero => [[_mm512_setzero_ps(); NR]; R],
        Init::Bias(b) => bias_rows_avx512::<R>(b),
        Init::Out => {
            let lo = t.cols.min(LANES);
            // SAFETY: the tile's rows have `cols` outputs; masked loads stay inside them.
            std::array::from_fn(|r| unsafe {
                let out = t.out.add(r * t.ldo);
                [
                    _mm512_maskz_loadu_ps(mask(lo), out),
                    _mm512_maskz_loadu_ps(mask(t.cols - lo), out.add(LANES)),
                ]
            })
        }
    };
    let x = t.x.as_ptr();
    for i in t.k0..t.k1 {
        // SAFETY: lanes are 64-byte aligned; `x` holds R rows of k.
        unsafe {
            let b0 = _mm512_load_ps(p0.as_ptr().add(i).cast());
            let b1 = _mm512_load_ps(p1.as_ptr().add(i).cast());
            for (r, row) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(r * k + i));
                row[0] = _mm512_fmadd_ps(a, b0, row[0]);
                row[1] = _mm512_fmadd_ps(a, b1, row[1]);
            }
        }
    }
    // SAFETY: the caller guarantees room for the tile.
    unsafe { store_rows_avx512(t.out, t.ldo, t.cols, &acc) };
}

/// Output columns of tile `t` (`NR` panels) among `n`: the first, and how
/// many are real (0 for a tile of padding only).
pub(super) fn tile_columns(t: usize, n: usize) -> (usize, usize) {
    let c0 = t * NR * LANES;
    (c0, (n - c0.min(n)).min(NR * LANES))
}

/// The micro-tiles covering `rows`: (first row, rows), at most `mr` each.
pub(super) fn row_tiles(
    rows: std::ops::Range<usize>,
    mr: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let end = rows.end;
    rows.step_by(mr).map(move |r| (r, mr.min(end - r)))
}

/// Accumulators of `R` rows starting from the tile's bias (`NR * LANES` values).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn bias_rows_avx512<const R: usize>(
    bias: &[f32],
) -> [[std::arch::x86_64::__m512; NR]; R] {
    use std::arch::x86_64::*;
    let b = &bias[..NR * LANES];
    // SAFETY: `b` holds NR registers' worth of values.
    let row = [0, 1].map(|j| unsafe { _mm512_loadu_ps(b.as_ptr().add(j * LANES)) });
    [row; R]
}

/// Stores accumulator rows to a tile's output: `cols` values of each row,
/// rows `ldo` apart.
///
/// # Safety
/// AVX-512F is present; `out` has room for `acc.len()` rows of `cols`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_rows_avx512(
    out: *mut f32,
    ldo: usize,
    cols: usize,
    acc: &[[std::arch::x86_64::__m512; NR]],
) {
    use std::arch::x86_64::*;
    let lo = cols.min(LANES);
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the row has `cols` valid outputs; masked stores stay inside them.
        unsafe {
            let out = out.add(r * ldo);
            if cols == NR * LANES {
                _mm512_storeu_ps(out, row[0]);
                _mm512_storeu_ps(out.add(LANES), row[1]);
            } else {
                _mm512_mask_storeu_ps(out, mask(lo), row[0]);
                _mm512_mask_storeu_ps(out.add(LANES), mask(cols - lo), row[1]);
            }
        }
    }
}

/// [`store_rows_avx512`] for plain accumulators.
///
/// # Safety
/// `out` has room for `acc.len()` rows of `cols`, `ldo` apart.
pub(super) unsafe fn store_rows(out: *mut f32, ldo: usize, cols: usize, acc: &[[f32; NR * LANES]]) {
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: per the caller.
        let out = unsafe { std::slice::from_raw_parts_mut(out.add(r * ldo), cols) };
        out.copy_from_slice(&row[..cols]);
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

/// AVX2 has 16 registers of 8 lanes, so the AVX-512 shape (R rows × 32
/// columns) would need 4R accumulators and spill. Each panel (16 columns, two
/// registers) is instead run over groups of at most [`AVX2_ROWS`] rows: 8
/// accumulators, two weight registers and one broadcast, 8 FMAs per 6 loads,
/// which keeps both FMA ports busy. The x rows are read once per panel; they
/// sit in L1 (`KC` inputs of a few rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(t: &Tile) {
    for half in 0..NR {
        let c = half * LANES;
        let cols = t.cols.saturating_sub(c).min(LANES);
        if cols == 0 {
            break; // the second panel is padding only
        }
        let mut r = 0;
        while r < R {
            let h = (R - r).min(AVX2_ROWS);
            let part = Avx2Part {
                x: &t.x[r * t.k..(r + h) * t.k],
                panel: &t.panel[half * t.k..(half + 1) * t.k],
                init: match t.init {
                    Init::Bias(b) => Init::Bias(&b[c..c + LANES]),
                    other => other,
                },
                // SAFETY: row `r` and column `c` are inside the tile.
                out: unsafe { t.out.add(r * t.ldo + c) },
                cols,
            };
            // SAFETY: the part's rows and columns are inside the tile.
            unsafe {
                match h {
                    1 => part_avx2::<1>(t, &part),
                    2 => part_avx2::<2>(t, &part),
                    3 => part_avx2::<3>(t, &part),
                    _ => part_avx2::<AVX2_ROWS>(t, &part),
                }
            }
            r += h;
        }
    }
}

/// Rows per register block of the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 4;

/// `H` rows of a tile times one of its panels.
#[cfg(target_arch = "x86_64")]
struct Avx2Part<'a> {
    /// `H` rows of `k`.
    x: &'a [f32],
    /// One panel of `k` lanes.
    panel: &'a [Lane],
    /// As the tile's, the bias narrowed to this panel's 16 columns.
    init: Init<'a>,
    out: *mut f32,
    /// Valid columns of this panel (1 to 16).
    cols: usize,
}

/// # Safety
/// AVX2 and FMA are present; `p.out` has room for `H` rows of `p.cols`, `t.ldo` apart.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn part_avx2<const H: usize>(t: &Tile, p: &Avx2Part) {
    use std::arch::x86_64::*;
    const HALF: usize = LANES / 2;
    let (k, ldo) = (t.k, t.ldo);
    let mut acc = [[_mm256_setzero_ps(); 2]; H];
    match p.init {
        Init::Zero => {}
        Init::Bias(b) => {
            // SAFETY: the bias is narrowed to 16 values.
            let row = unsafe {
                [
                    _mm256_loadu_ps(b.as_ptr()),
                    _mm256_loadu_ps(b.as_ptr().add(HALF)),
                ]
            };
            acc = [row; H];
        }
        Init::Out => {
            for (r, row) in acc.iter_mut().enumerate() {
                let mut buf = [0f32; LANES];
                // SAFETY: each row has `cols` outputs.
                unsafe {
                    std::ptr::copy_nonoverlapping(p.out.add(r * ldo), buf.as_mut_ptr(), p.cols);
                    *row = [
                        _mm256_loadu_ps(buf.as_ptr()),
                        _mm256_loadu_ps(buf.as_ptr().add(HALF)),
                    ];
                }
            }
        }
    }
    let (x, w) = (p.x.as_ptr(), p.panel.as_ptr());
    for i in t.k0..t.k1 {
        // SAFETY: lanes are 64-byte aligned; `x` holds H rows of k.
        unsafe {
            let b = w.add(i).cast::<f32>();
            let (b0, b1) = (_mm256_load_ps(b), _mm256_load_ps(b.add(HALF)));
            for (r, row) in acc.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*x.add(r * k + i));
                row[0] = _mm256_fmadd_ps(a, b0, row[0]);
                row[1] = _mm256_fmadd_ps(a, b1, row[1]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: each row has room for `cols` outputs.
        unsafe {
            let out = p.out.add(r * ldo);
            if p.cols == LANES {
                _mm256_storeu_ps(out, row[0]);
                _mm256_storeu_ps(out.add(HALF), row[1]);
            } else {
                let mut buf = [0f32; LANES];
                _mm256_storeu_ps(buf.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(buf.as_mut_ptr().add(HALF), row[1]);
                std::ptr::copy_nonoverlapping(buf.as_ptr(), out, p.cols);
            }
        }
    }
}

/// The same tile in plain Rust; fixed-size accumulators let LLVM keep them in
/// vector registers for whatever instruction set the caller enabled.
#[inline(always)]
fn tile_portable<const R: usize>(t: &Tile) {
    let k = t.k;
    let (p0, p1) = t.panel.split_at(k);
    let mut acc = [[0f32; NR * LANES]; R];
    match t.init {
        Init::Zero => {}
        Init::Bias(b) => {
            for row in acc.iter_mut() {
                row.copy_from_slice(&b[..NR * LANES]);
            }
        }
        Init::Out => {
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller guarantees `cols` outputs in each row.
                let out = unsafe { std::slice::from_raw_parts(t.out.add(r * t.ldo), t.cols) };
                row[..t.cols].copy_from_slice(out);
            }
        }
    }
    for i in t.k0..t.k1 {
        let (b0, b1) = (&p0[i].0, &p1[i].0);
        for (r, row) in acc.iter_mut().enumerate() {
            let a = t.x[r * k + i];
            for l in 0..LANES {
                row[l] += a * b0[l];
                row[LANES + l] += a * b1[l];
            }
        }
    }
    // SAFETY: the caller guarantees room for the tile.
    unsafe { store_rows(t.out, t.ldo, t.cols, &acc) };
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
                (5, 300, 16, true),
                (6, 50, 70, false),
                (7, 64, 40, true),
            ] {
                check(m, k, n, bias, kernel);
            }
        }
    }
}
