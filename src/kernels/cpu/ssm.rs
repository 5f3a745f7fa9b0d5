//! State-space model kernels: the causal depthwise convolution with its
//! rolling state, Mamba's selective scan and Mamba-2's scalar-decay (SSD)
//! scan. Each works on one sequence's new tokens and carries the
//! sequence's state in place, so a prompt prefilled in chunks gives what
//! one pass gives, and a decode step costs O(state) whatever the context.
//!
//! Layouts: activations are token-major (`[t][channels]`, rows of the
//! projections' outputs), states are channel-major (`[channels][state]`),
//! the convolution state holds the last `k - 1` inputs token-major.

use rayon::prelude::*;

/// Checks that fail are the caller's bug (the models size every buffer from
/// their config), so they panic with a message rather than return errors.
fn check(ok: bool, what: &str) {
    assert!(ok, "ssm kernel: {what}");
}

/// `silu(bias + Σⱼ w[j] · input[i - k + 1 + j])` per channel for each of the
/// `t` rows of `x` (`[t][c]`), where inputs before the first row come from
/// `state` (`[k - 1][c]`, oldest first); `state` then holds the last `k - 1`
/// inputs. `w` is `[k][c]` (the checkpoint's `[c, 1, k]`, transposed so that
/// the inner loop runs over contiguous channels).
pub fn causal_conv1d_silu(
    x: &[f32],
    state: &mut [f32],
    w: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    out: &mut [f32],
) {
    check(
        k >= 1 && w.len().is_multiple_of(k),
        "conv weight is not [k][c]",
    );
    let c = w.len() / k;
    check(
        c > 0 && x.len().is_multiple_of(c),
        "conv input is not [t][c]",
    );
    check(state.len() == (k - 1) * c, "conv state is not [k - 1][c]");
    check(out.len() == x.len(), "conv output length");
    check(bias.is_none_or(|b| b.len() == c), "conv bias length");
    let t = x.len() / c;
    let input = |p: usize| -> &[f32] {
        // Position p of the extended input: the state's k - 1 rows, then x.
        if p < k - 1 {
            &state[p * c..(p + 1) * c]
        } else {
            &x[(p - (k - 1)) * c..(p - k + 2) * c]
        }
    };
    for (i, o) in out.chunks_exact_mut(c).enumerate() {
        match bias {
            Some(b) => o.copy_from_slice(b),
            None => o.fill(0.0),
        }
        for j in 0..k {
            for ((o, &w), &v) in o.iter_mut().zip(&w[j * c..(j + 1) * c]).zip(input(i + j)) {
                *o += w * v;
            }
        }
        for o in o.iter_mut() {
            *o /= 1.0 + (-*o).exp();
        }
    }
    // The new state: the last k - 1 rows of [state; x].
    if k > 1 {
        let keep = (k - 1).saturating_sub(t);
        state.copy_within((k - 1 - keep) * c.., 0);
        let from_x = (k - 1 - keep).min(t);
        state[keep * c..].copy_from_slice(&x[(t - from_x) * c..]);
    }
}

/// Mamba's per-channel parameters.
pub struct SelectiveScan<'a> {
    /// `A = -exp(A_log)`, `[d][n]`.
    pub a: &'a [f32],
    /// The skip connection `D`, `[d]`.
    pub d_skip: &'a [f32],
    /// State size `n`.
    pub n: usize,
}

/// Mamba's selective scan over `t` tokens: per channel `ch` and token `i`,
/// `h ← exp(Δ·A[ch]) ⊙ h + Δ·u·B[i]`, `y = ⟨h, C[i]⟩ + D[ch]·u`, gated by
/// `silu(z)`. `u`, `delta` (after softplus), `z` are `[t][d]`; `b` and `c`
/// are rows of `n` values `stride` apart (columns of the `x_proj` output);
/// `state` is `[d][n]`. Writes `y` (`[t][d]`).
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    p: &SelectiveScan,
    u: &[f32],
    delta: &[f32],
    z: &[f32],
    (b, c, stride): (&[f32], &[f32], usize),
    state: &mut [f32],
    y: &mut [f32],
) {
    let n = p.n;
    let d = p.d_skip.len();
    check(n > 0 && d > 0 && p.a.len() == d * n, "A is not [d][n]");
    check(u.len().is_multiple_of(d), "u is not [t][d]");
    let t = u.len() / d;
    check(
        delta.len() == u.len() && z.len() == u.len() && y.len() == u.len(),
        "[t][d] inputs",
    );
    check(
        stride >= n
            && (t == 0 || (b.len() >= (t - 1) * stride + n && c.len() >= (t - 1) * stride + n)),
        "B and C rows",
    );
    check(state.len() == d * n, "state is not [d][n]");
    // Channels are independent: split them across threads when the step is
    // big enough (a prompt); the output comes back channel-major.
    let chunk = if t * d * n >= 1 << 16 {
        d.div_ceil(rayon::current_num_threads() * 4).max(8)
    } else {
        d
    };
    let mut yt = vec![0f32; t * d];
    yt.par_chunks_mut(chunk * t)
        .zip(state.par_chunks_mut(chunk * n))
        .enumerate()
        .for_each(|(ci, (yt, h))| {
            let c0 = ci * chunk;
            let width = h.len() / n;
            for i in 0..t {
                let (bi, ci_) = (
                    &b[i * stride..i * stride + n],
                    &c[i * stride..i * stride + n],
                );
                for ch in 0..width {
                    let g = c0 + ch;
                    let (dt, x) = (delta[i * d + g], u[i * d + g]);
                    let acc = scan_channel(
                        &p.a[g * n..(g + 1) * n],
                        &mut h[ch * n..(ch + 1) * n],
                        dt,
                        dt * x,
                        bi,
                        ci_,
                    );
                    let zz = z[i * d + g];
                    yt[ch * t + i] = (acc + p.d_skip[g] * x) * (zz / (1.0 + (-zz).exp()));
                }
            }
        });
    for (i, row) in y.chunks_exact_mut(d).enumerate() {
        for (g, v) in row.iter_mut().enumerate() {
            *v = yt[g * t + i];
        }
    }
}

/// One channel, one token: `h ← exp(dt·a) ⊙ h + dtx·b`; returns `⟨h, c⟩`.
#[inline]
fn scan_channel(a: &[f32], h: &mut [f32], dt: f32, dtx: f32, b: &[f32], c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len().is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; all four slices hold a.len() values
        // (the caller sliced them so), a multiple of 16.
        return unsafe { scan_channel_avx512(a, h, dt, dtx, b, c) };
    }
    let mut acc = 0f32;
    for (((h, &a), &b), &c) in h.iter_mut().zip(a).zip(b).zip(c) {
        *h = (dt * a).exp() * *h + dtx * b;
        acc += *h * c;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_channel_avx512(
    a: &[f32],
    h: &mut [f32],
    dt: f32,
    dtx: f32,
    b: &[f32],
    c: &[f32],
) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    let (vdt, vdtx) = (_mm512_set1_ps(dt), _mm512_set1_ps(dtx));
    for s in (0..a.len()).step_by(16) {
        // SAFETY: s + 16 <= len of every slice, per the caller.
        unsafe {
            let va = _mm512_loadu_ps(a.as_ptr().add(s));
            let vh = _mm512_loadu_ps(h.as_ptr().add(s));
            let vb = _mm512_loadu_ps(b.as_ptr().add(s));
            let vc = _mm512_loadu_ps(c.as_ptr().add(s));
            let decay = super::vmath::exp(_mm512_mul_ps(vdt, va));
            let nh = _mm512_fmadd_ps(decay, vh, _mm512_mul_ps(vdtx, vb));
            _mm512_storeu_ps(h.as_mut_ptr().add(s), nh);
            acc = _mm512_fmadd_ps(nh, vc, acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// Mamba-2's per-head parameters.
pub struct SsdScan<'a> {
    /// `A = -exp(A_log)`, one per head.
    pub a: &'a [f32],
    /// The skip connection `D`, one per head.
    pub d_skip: &'a [f32],
    pub head_dim: usize,
    /// State size `n` (per group).
    pub n: usize,
    /// Groups sharing B and C (heads `g·H/G .. (g+1)·H/G` use group `g`).
    pub n_groups: usize,
}

/// Mamba-2's scan over `t` tokens: per head `h` with `dt = dt[i][h]`
/// (after softplus and clamping), `S ← exp(dt·A[h])·S + dt·x ⊗ B[g]`,
/// `y = S·C[g] + D[h]·x`. `xbc` rows hold `[x (H·P) | B (G·n) | C (G·n)]`
/// (the convolution's output), `dt` is `[t][H]`, `state` is `[H][P][n]`;
/// writes `y` (`[t][H·P]`).
pub fn ssd_scan(p: &SsdScan, xbc: &[f32], dt: &[f32], state: &mut [f32], y: &mut [f32]) {
    let heads = p.a.len();
    let (hd, n, g) = (p.head_dim, p.n, p.n_groups);
    check(
        heads > 0 && p.d_skip.len() == heads && g > 0 && heads.is_multiple_of(g),
        "heads and groups",
    );
    let inner = heads * hd;
    let width = inner + 2 * g * n;
    check(
        xbc.len().is_multiple_of(width),
        "xbc is not [t][H·P + 2·G·n]",
    );
    let t = xbc.len() / width;
    check(dt.len() == t * heads, "dt is not [t][H]");
    check(state.len() == heads * hd * n, "state is not [H][P][n]");
    check(y.len() == t * inner, "y is not [t][H·P]");
    let per_group = heads / g;
    // Heads are independent: one task each for prompts, one pass for decode.
    let min_heads = if t * hd * n * heads >= 1 << 16 {
        1
    } else {
        heads
    };
    let mut yt = vec![0f32; t * inner];
    yt.par_chunks_mut(t * hd)
        .zip(state.par_chunks_mut(hd * n))
        .enumerate()
        .with_min_len(min_heads)
        .for_each(|(h, (yt, s))| {
            let grp = h / per_group;
            for i in 0..t {
                let row = &xbc[i * width..(i + 1) * width];
                let x = &row[h * hd..(h + 1) * hd];
                let b = &row[inner + grp * n..inner + (grp + 1) * n];
                let c = &row[inner + (g + grp) * n..inner + (g + grp + 1) * n];
                let d = dt[i * heads + h];
                let decay = (d * p.a[h]).exp();
                for (j, s) in s.chunks_exact_mut(n).enumerate() {
                    let dx = d * x[j];
                    let mut acc = 0f32;
                    for ((s, &b), &c) in s.iter_mut().zip(b).zip(c) {
                        *s = decay * *s + dx * b;
                        acc += *s * c;
                    }
                    yt[j * t + i] = acc + p.d_skip[h] * x[j];
                }
            }
        });
    for (i, row) in y.chunks_exact_mut(inner).enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = yt[k * t + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn silu(v: f32) -> f32 {
        v / (1.0 + (-v).exp())
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    /// The convolution as its definition: zero-padded on the left over the
    /// whole sequence.
    fn conv_ref(x: &[f32], w: &[f32], bias: &[f32], k: usize) -> Vec<f32> {
        let c = bias.len();
        let t = x.len() / c;
        let mut out = vec![0f32; x.len()];
        for i in 0..t {
            for ch in 0..c {
                let mut s = bias[ch];
                for j in 0..k {
                    let p = i as isize - (k - 1) as isize + j as isize;
                    if p >= 0 {
                        s += w[j * c + ch] * x[p as usize * c + ch];
                    }
                }
                out[i * c + ch] = silu(s);
            }
        }
        out
    }

    #[test]
    fn conv_in_chunks_is_the_whole_convolution() {
        let mut seed = 1;
        for (k, c, t) in [(4, 6, 11), (2, 3, 5), (1, 4, 3), (5, 8, 2)] {
            let x = rand(&mut seed, t * c, 1.0);
            let w = rand(&mut seed, k * c, 1.0);
            let bias = rand(&mut seed, c, 0.5);
            let want = conv_ref(&x, &w, &bias, k);
            for step in [1, 2, 3, t] {
                let mut state = vec![0f32; (k - 1) * c];
                let mut got = vec![0f32; x.len()];
                for (xi, oi) in x.chunks(step * c).zip(got.chunks_mut(step * c)) {
                    causal_conv1d_silu(xi, &mut state, &w, Some(&bias), k, oi);
                }
                close(&got, &want, 1e-6);
            }
        }
    }

    fn scan_ref(
        p: &SelectiveScan,
        u: &[f32],
        delta: &[f32],
        z: &[f32],
        b: &[f32],
        c: &[f32],
    ) -> Vec<f32> {
        let (n, d) = (p.n, p.d_skip.len());
        let t = u.len() / d;
        let mut h = vec![0f64; d * n];
        let mut y = vec![0f32; t * d];
        for i in 0..t {
            for ch in 0..d {
                let (dt, x) = (delta[i * d + ch] as f64, u[i * d + ch] as f64);
                let mut acc = 0f64;
                for s in 0..n {
                    let hs = &mut h[ch * n + s];
                    *hs = (dt * p.a[ch * n + s] as f64).exp() * *hs + dt * b[i * n + s] as f64 * x;
                    acc += *hs * c[i * n + s] as f64;
                }
                y[i * d + ch] = ((acc + p.d_skip[ch] as f64 * x) as f32) * silu(z[i * d + ch]);
            }
        }
        y
    }

    #[test]
    fn selective_scan_matches_the_recurrence_in_any_chunking() {
        let mut seed = 7;
        for (d, n, t) in [(8, 16, 9), (5, 3, 6), (40, 32, 70)] {
            let a: Vec<f32> = rand(&mut seed, d * n, 1.0)
                .iter()
                .map(|v| -(v.abs() + 0.1))
                .collect();
            let d_skip = rand(&mut seed, d, 1.0);
            let p = SelectiveScan {
                a: &a,
                d_skip: &d_skip,
                n,
            };
            let u = rand(&mut seed, t * d, 1.0);
            let delta: Vec<f32> = rand(&mut seed, t * d, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let z = rand(&mut seed, t * d, 1.0);
            let b = rand(&mut seed, t * n, 1.0);
            let c = rand(&mut seed, t * n, 1.0);
            let want = scan_ref(&p, &u, &delta, &z, &b, &c);
            for step in [1, 7, t] {
                let mut h = vec![0f32; d * n];
                let mut y = vec![0f32; t * d];
                for i0 in (0..t).step_by(step) {
                    let i1 = (i0 + step).min(t);
                    let r = i0 * d..i1 * d;
                    selective_scan(
                        &p,
                        &u[r.clone()],
                        &delta[r.clone()],
                        &z[r.clone()],
                        (&b[i0 * n..], &c[i0 * n..], n),
                        &mut h,
                        &mut y[r],
                    );
                }
                close(&y, &want, 2e-5);
            }
        }
    }

    #[test]
    fn ssd_scan_matches_the_recurrence_in_any_chunking() {
        let mut seed = 11;
        for (heads, hd, n, g, t) in [(4, 3, 5, 2, 9), (2, 8, 16, 1, 40), (6, 4, 8, 3, 3)] {
            let a: Vec<f32> = rand(&mut seed, heads, 1.0)
                .iter()
                .map(|v| -(v.abs() + 0.1))
                .collect();
            let d_skip = rand(&mut seed, heads, 1.0);
            let p = SsdScan {
                a: &a,
                d_skip: &d_skip,
                head_dim: hd,
                n,
                n_groups: g,
            };
            let width = heads * hd + 2 * g * n;
            let xbc = rand(&mut seed, t * width, 1.0);
            let dt: Vec<f32> = rand(&mut seed, t * heads, 1.0)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            // The recurrence in f64.
            let inner = heads * hd;
            let mut s = vec![0f64; heads * hd * n];
            let mut want = vec![0f32; t * inner];
            for i in 0..t {
                let row = &xbc[i * width..(i + 1) * width];
                for h in 0..heads {
                    let grp = h / (heads / g);
                    let d = dt[i * heads + h] as f64;
                    let decay = (d * a[h] as f64).exp();
                    for j in 0..hd {
                        let x = row[h * hd + j] as f64;
                        let mut acc = 0f64;
                        for k in 0..n {
                            let st = &mut s[(h * hd + j) * n + k];
                            *st = decay * *st + d * x * row[inner + grp * n + k] as f64;
                            acc += *st * row[inner + (g + grp) * n + k] as f64;
                        }
                        want[i * inner + h * hd + j] = (acc + d_skip[h] as f64 * x) as f32;
                    }
                }
            }
            for step in [1, 7, t] {
                let mut state = vec![0f32; heads * hd * n];
                let mut y = vec![0f32; t * inner];
                for i0 in (0..t).step_by(step) {
                    let i1 = (i0 + step).min(t);
                    ssd_scan(
                        &p,
                        &xbc[i0 * width..i1 * width],
                        &dt[i0 * heads..i1 * heads],
                        &mut state,
                        &mut y[i0 * inner..i1 * inner],
                    );
                }
                close(&y, &want, 2e-5);
            }
        }
    }
}
