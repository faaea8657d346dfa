//! The CPU reference kernels: f32 throughout, GEMMs from `gemm` (the
//! kernels faer is built on; multi-threaded on rayon), the rest written out plainly so that the CUDA
//! kernels have one definition to match.

/// `x · wᵀ`: `x` is `rows × k` row-major, `w` is `out × k` row-major (a
/// Hugging Face linear weight); the result is `rows × out`.
///
/// A few rows (decode steps) take the weights once, row by row, in
/// parallel: packing them for a GEMM would copy every weight per step.
pub fn matmul_t(x: &[f32], rows: usize, k: usize, w: &[f32], out: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), out * k);
    let mut y = vec![0.0f32; rows * out];
    if rows == 0 || out == 0 {
        return y;
    }
    if rows <= GEMV_ROWS {
        gemv_rows(x, rows, k, w, out, &mut y);
        return y;
    }
    // SAFETY: the slices hold rows×k, out×k and rows×out elements, and the
    // strides below address exactly those (w read transposed: its rows are
    // the columns of wᵀ)
    unsafe {
        gemm::gemm(
            rows,
            out,
            k,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    y
}

/// Up to this many rows go through [`gemv_rows`] (B8: with four rows per
/// weight load, 32 rows are faster this way than through the GEMM).
const GEMV_ROWS: usize = 32;
/// Weight rows per parallel task in [`gemv_rows`].
const GEMV_CHUNK: usize = 64;

/// `y = x · wᵀ` for a few rows of `x`: each task takes a run of weight
/// rows and dots them with every row of `x` while they are in cache.
fn gemv_rows(x: &[f32], rows: usize, k: usize, w: &[f32], out: usize, y: &mut [f32]) {
    use rayon::prelude::*;
    // results land transposed (out × rows), per task contiguous
    let mut t = vec![0.0f32; out * rows];
    t.par_chunks_mut(GEMV_CHUNK * rows)
        .zip(w.par_chunks(GEMV_CHUNK * k))
        .for_each(|(t, w)| {
            for (o, wr) in w.chunks_exact(k).enumerate() {
                let t = &mut t[o * rows..(o + 1) * rows];
                let mut quads = x.chunks_exact(4 * k);
                for (t, xq) in t.chunks_exact_mut(4).zip(&mut quads) {
                    t.copy_from_slice(&dot4(xq, wr));
                }
                let done = rows / 4 * 4;
                for (t, xr) in t[done..].iter_mut().zip(quads.remainder().chunks_exact(k)) {
                    *t = dot(xr, wr);
                }
            }
        });
    for o in 0..out {
        for r in 0..rows {
            y[r * out + o] = t[o * rows + r];
        }
    }
}

/// Adds `bias` to every row of `x` (`rows × bias.len()`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

/// RMSNorm of every row of `x`, as Hugging Face's Llama computes it:
/// `w · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x
        .chunks_exact(weight.len())
        .zip(out.chunks_exact_mut(weight.len()))
    {
        let mean = row.iter().map(|a| a * a).sum::<f32>() / row.len() as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, a), w) in o.iter_mut().zip(row).zip(weight) {
            *o = w * (a * scale);
        }
    }
    out
}

/// SwiGLU: `gate_up` rows are `[gate | up]` (`2·width` each); answers
/// `silu(gate) · up`, `width` per row.
pub fn swiglu(gate_up: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * width) {
        let (gate, up) = row.split_at(width);
        out.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
    }
    out
}

/// `a += b`, elementwise.
pub fn add_into(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above
            return unsafe { dot_fma(a, b) };
        }
    }
    dot_plain(a, b)
}

/// [`dot`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// The dots of four rows of `x` (`4 × w.len()`, row-major) with `w`, each
/// the same bits as [`dot`] of that row: one load of each piece of `w`
/// serves four rows (the decode path is bound by loads, not arithmetic).
fn dot4(x: &[f32], w: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above
            return unsafe { dot4_avx512(x, w) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above
            return unsafe { dot4_fma(x, w) };
        }
    }
    let k = w.len();
    std::array::from_fn(|r| dot_plain(&x[r * k..(r + 1) * k], w))
}

/// [`dot4`] compiled for AVX2 with fused multiply-adds; per row the lanes
/// and the order of the sums are [`dot_fma`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_fma(x: &[f32], w: &[f32]) -> [f32; 4] {
    let k = w.len();
    let (x0, rest) = x.split_at(k);
    let (x1, rest) = rest.split_at(k);
    let (x2, x3) = rest.split_at(k);
    let mut acc = [[0.0f32; 16]; 4];
    let cw = w.chunks_exact(16);
    let tail = cw.remainder().len();
    let rows = x0
        .chunks_exact(16)
        .zip(x1.chunks_exact(16))
        .zip(x2.chunks_exact(16).zip(x3.chunks_exact(16)));
    for (y, ((a, b), (c, d))) in cw.zip(rows) {
        for i in 0..16 {
            acc[0][i] = a[i].mul_add(y[i], acc[0][i]);
            acc[1][i] = b[i].mul_add(y[i], acc[1][i]);
            acc[2][i] = c[i].mul_add(y[i], acc[2][i]);
            acc[3][i] = d[i].mul_add(y[i], acc[3][i]);
        }
    }
    let wt = &w[k - tail..];
    let sum = |acc: &[f32; 16], xr: &[f32]| {
        acc.iter().sum::<f32>()
            + xr[k - tail..]
                .iter()
                .zip(wt)
                .map(|(x, y)| x * y)
                .sum::<f32>()
    };
    [
        sum(&acc[0], x0),
        sum(&acc[1], x1),
        sum(&acc[2], x2),
        sum(&acc[3], x3),
    ]
}

/// [`dot4`] on AVX-512: the sixteen lanes of [`dot_fma`] are one register,
/// each lane's fused multiply-adds in the same order, and the lanes summed
/// in the same order, so the bits are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(x: &[f32], w: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = w.len();
    let full = k / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= k, and x holds 4 rows of k
        unsafe {
            let y = _mm512_loadu_ps(w.as_ptr().add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                let xr = _mm512_loadu_ps(x.as_ptr().add(r * k + c));
                *a = _mm512_fmadd_ps(xr, y, *a);
            }
        }
        c += 16;
    }
    std::array::from_fn(|r| {
        let mut lanes = [0.0f32; 16];
        // SAFETY: lanes holds 16 f32
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        let xr = &x[r * k + full..(r + 1) * k];
        lanes.iter().sum::<f32>() + xr.iter().zip(&w[full..]).map(|(x, y)| x * y).sum::<f32>()
    })
}

fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    // eight lanes, so that the compiler vectorizes without reassociating
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_four_at_a_time_are_the_same_bits_as_one_at_a_time() {
        for k in [5, 16, 70, 512] {
            let w: Vec<f32> = (0..k)
                .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
                .collect();
            let x: Vec<f32> = (0..4 * k)
                .map(|i| ((i * 104729) % 997) as f32 / 89.0 - 5.5)
                .collect();
            let four = dot4(&x, &w);
            for (r, got) in four.iter().enumerate() {
                let one = dot(&x[r * k..(r + 1) * k], &w);
                assert_eq!(got.to_bits(), one.to_bits(), "k {k}, row {r}");
            }
        }
    }

    #[test]
    fn the_gemv_path_agrees_with_the_gemm() {
        let (k, out) = (70, 130);
        let w: Vec<f32> = (0..out * k)
            .map(|i| ((i * 7919) % 13) as f32 - 6.0)
            .collect();
        let big = GEMV_ROWS + 3;
        let x: Vec<f32> = (0..big * k)
            .map(|i| ((i * 104729) % 11) as f32 - 5.0)
            .collect();
        let gemm = matmul_t(&x, big, k, &w, out);
        for rows in [1, 3, 4, 5, 8, GEMV_ROWS] {
            let gemv = matmul_t(&x[..rows * k], rows, k, &w, out);
            assert_eq!(gemv, gemm[..rows * out].to_vec(), "{rows} rows");
        }
    }

    #[test]
    fn matmul_t_is_x_times_w_transposed() {
        // x: 2×3, w: 2×3 → 2×2
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, 0.0, -1.0, 0.5, 0.5, 0.5];
        assert_eq!(matmul_t(&x, 2, 3, &w, 2), vec![-2.0, 3.0, -2.0, 7.5]);
    }

    #[test]
    fn norms_and_activations() {
        let n = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let s = (12.5f32).sqrt();
        assert!((n[0] - 3.0 / s).abs() < 1e-6 && (n[1] - 8.0 / s).abs() < 1e-6);
        let g = swiglu(&[0.0, 1.0, 5.0, 7.0], 2);
        assert!((g[0] - 0.0).abs() < 1e-6 && (g[1] - 0.7310586 * 7.0).abs() < 1e-5);
        let mut p = vec![1.0, 1.0, 1.0, 1.0];
        softmax(&mut p);
        assert_eq!(p, vec![0.25; 4]);
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
    }
}
