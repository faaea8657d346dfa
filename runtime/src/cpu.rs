//! The CPU reference kernels: f32 throughout, GEMMs from `matrixmultiply`
//! (multi-threaded), the rest written out plainly so that the CUDA
//! kernels have one definition to match.

/// `x · wᵀ`: `x` is `rows × k` row-major, `w` is `out × k` row-major (a
/// Hugging Face linear weight); the result is `rows × out`.
pub fn matmul_t(x: &[f32], rows: usize, k: usize, w: &[f32], out: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), out * k);
    let mut y = vec![0.0f32; rows * out];
    if rows == 0 || out == 0 {
        return y;
    }
    // SAFETY: the slices hold rows×k, out×k and rows×out elements, and the
    // strides below address exactly those (w read transposed: its rows are
    // the columns of wᵀ)
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            out,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr(),
            out as isize,
            1,
        );
    }
    y
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
    for (row, o) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
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
    // four lanes, so that the compiler vectorizes without reassociating
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
