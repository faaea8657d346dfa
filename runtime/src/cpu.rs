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

/// Up to this many rows go through [`gemv_rows`] (B8: 16 rows are faster
/// row by row, 32 through the GEMM).
const GEMV_ROWS: usize = 16;
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
                for (r, xr) in x.chunks_exact(k).enumerate() {
                    t[o * rows + r] = dot(xr, wr);
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
        for rows in [1, 3, GEMV_ROWS] {
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
