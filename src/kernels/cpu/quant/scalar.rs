//! The block formats in plain Rust: each 32-value sub-block decoded to small
//! integers `q`, per-16 scales and a minimum (`w = scale[i / 16] · q + min`),
//! as ggml's `dequantize_row_*` define them. The reference for the SIMD
//! kernels and the fallback on CPUs without them.

use half::f16;

use super::{ActRow, QType, QK};

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One 32-value sub-block: `w[i] = scale[i / 16] * q[i] + min`.
pub struct Sub {
    pub q: [i8; QK],
    pub scale: [f32; 2],
    pub min: f32,
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block.
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Sub-block `s` of block `b` (`s < block_values / 32`).
pub fn decode(ty: QType, b: &[u8], s: usize) -> Sub {
    let mut q = [0i8; QK];
    let (scale, min) = match ty {
        QType::Q4_0 | QType::Q4_1 => {
            let (d, m, qs) = match ty {
                QType::Q4_0 => (f16_at(b, 0), 0.0, &b[2..18]),
                _ => (f16_at(b, 0), f16_at(b, 2), &b[4..20]),
            };
            let off = if ty == QType::Q4_0 { 8 } else { 0 };
            for j in 0..16 {
                q[j] = (qs[j] & 0xF) as i8 - off;
                q[j + 16] = (qs[j] >> 4) as i8 - off;
            }
            (d, m)
        }
        QType::Q5_0 | QType::Q5_1 => {
            let (d, m, qh, qs) = match ty {
                QType::Q5_0 => (f16_at(b, 0), 0.0, &b[2..6], &b[6..22]),
                _ => (f16_at(b, 0), f16_at(b, 2), &b[4..8], &b[8..24]),
            };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            let off = if ty == QType::Q5_0 { 16 } else { 0 };
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                q[j] = ((qs[j] & 0xF) as u32 | h0) as i8 - off;
                q[j + 16] = ((qs[j] >> 4) as u32 | h1) as i8 - off;
            }
            (d, m)
        }
        QType::Q8_0 => {
            for (o, v) in q.iter_mut().zip(&b[2..34]) {
                *o = *v as i8;
            }
            (f16_at(b, 0), 0.0)
        }
        QType::Q4K | QType::Q5K => {
            let (d, dmin, scales) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
            let (ql, qh) = match ty {
                QType::Q4K => (&b[16 + 32 * (s / 2)..][..32], None),
                _ => (&b[48 + 32 * (s / 2)..][..32], Some(&b[16..48])),
            };
            for l in 0..32 {
                let lo = if s.is_multiple_of(2) {
                    ql[l] & 0xF
                } else {
                    ql[l] >> 4
                };
                let hi = qh.map_or(0, |h| ((h[l] >> s) & 1) << 4);
                q[l] = (lo | hi) as i8;
            }
            let (sc, m) = scale_min_k4(s, scales);
            (d * sc as f32, -(dmin * m as f32))
        }
        QType::Q6K => {
            let half = s / 4;
            let t = s % 4;
            let ql = &b[64 * half..];
            let qh = &b[128 + 32 * half..];
            let sc = &b[192 + 8 * half..];
            let d = f16_at(b, 208);
            for l in 0..32 {
                let lo = match t {
                    0 => ql[l] & 0xF,
                    1 => ql[l + 32] & 0xF,
                    2 => ql[l] >> 4,
                    _ => ql[l + 32] >> 4,
                };
                let hi = (qh[l] >> (2 * t)) & 3;
                q[l] = (lo | (hi << 4)) as i8 - 32;
            }
            let scale = [d * sc[2 * t] as i8 as f32, d * sc[2 * t + 1] as i8 as f32];
            return Sub { q, scale, min: 0.0 };
        }
    };
    Sub {
        q,
        scale: [scale; 2],
        min,
    }
}

/// The sub-blocks of a row in order (each block's sub-blocks, block by block).
fn subs(ty: QType, row: &[u8]) -> impl Iterator<Item = Sub> + '_ {
    let per = ty.block_values() / QK;
    row.chunks_exact(ty.block_bytes())
        .flat_map(move |b| (0..per).map(move |s| decode(ty, b, s)))
}

pub fn dequantize_row(ty: QType, row: &[u8], out: &mut [f32]) {
    for (sub, out) in subs(ty, row).zip(out.chunks_exact_mut(QK)) {
        for (i, (o, q)) in out.iter_mut().zip(sub.q).enumerate() {
            *o = sub.scale[i / 16] * q as f32 + sub.min;
        }
    }
}

pub fn dot(ty: QType, row: &[u8], x: ActRow) -> f32 {
    let mut acc = 0f32;
    for (g, sub) in subs(ty, row).enumerate() {
        let xq = &x.q[g * QK..(g + 1) * QK];
        let xd = x.d[g * QK / x.block];
        let mut idot = [0i32; 2];
        for (i, (w, x)) in sub.q.iter().zip(xq).enumerate() {
            idot[i / 16] += *w as i32 * *x as i32;
        }
        let xsum = (x.sum16[2 * g] as i32 + x.sum16[2 * g + 1] as i32) as f32;
        acc +=
            xd * (sub.scale[0] * idot[0] as f32 + sub.scale[1] * idot[1] as f32 + sub.min * xsum);
    }
    acc
}
