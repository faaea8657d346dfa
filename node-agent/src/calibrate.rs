//! A short calibration of each GPU at start, through CUDA (cudarc, loaded at
//! run time): cuBLAS GEMM throughput in FP32 and FP16, and device-to-device
//! copy bandwidth.
//!
//! cudarc panics if it is asked to load a library that is absent, so every
//! library is probed first (`is_culib_present`) and the whole measurement
//! runs under `catch_unwind` as a last guard (an old driver may lack a
//! symbol). Where CUDA is missing, each GPU's calibration says why it was
//! skipped and the agent goes on.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaStream};

/// What calibration measured on one GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Calibration {
    pub sgemm_tflops: f64,
    pub hgemm_tflops: f64,
    pub copy_gbps: f64,
    /// Empty when measured; otherwise why not.
    pub skipped: String,
}

impl Calibration {
    fn skipped(why: impl Into<String>) -> Calibration {
        Calibration {
            skipped: why.into(),
            ..Default::default()
        }
    }
}

/// Why CUDA cannot be used on this host, or `None` when it can.
pub fn cuda_unavailable() -> Option<String> {
    // SAFETY: only tries to dlopen the candidate library names and closes them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("CUDA driver library (libcuda.so.1) not found".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Some("cuBLAS (libcublas.so.12 and libcublasLt.so.12) not found".into());
    }
    None
}

/// Calibrates GPUs `0..count` (CUDA ordinals, which follow NVML's order
/// when CUDA_DEVICE_ORDER=PCI_BUS_ID). GPUs with MIG enabled are skipped:
/// CUDA sees a MIG instance only from a process started with it in
/// CUDA_VISIBLE_DEVICES.
pub fn calibrate_all(count: u32, mig_enabled: &[bool]) -> Vec<Calibration> {
    if let Some(why) = cuda_unavailable() {
        return (0..count)
            .map(|_| Calibration::skipped(why.clone()))
            .collect();
    }
    (0..count)
        .map(|ordinal| {
            if mig_enabled.get(ordinal as usize).copied().unwrap_or(false) {
                return Calibration::skipped(
                    "MIG is enabled: instances are not calibrated from the agent process",
                );
            }
            match std::panic::catch_unwind(|| calibrate(ordinal as usize)) {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => Calibration::skipped(format!("CUDA error: {e}")),
                Err(_) => Calibration::skipped(
                    "CUDA library panicked (an old driver may lack a needed symbol)",
                ),
            }
        })
        .collect()
}

fn gemm_tflops<T>(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    n: usize,
    one: T,
    zero: T,
) -> anyhow::Result<f64>
where
    T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy,
    CudaBlas: Gemm<T>,
{
    let a = stream.alloc_zeros::<T>(n * n)?;
    let b = stream.alloc_zeros::<T>(n * n)?;
    let mut c = stream.alloc_zeros::<T>(n * n)?;
    let cfg = || GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: one,
        lda: n as i32,
        ldb: n as i32,
        beta: zero,
        ldc: n as i32,
    };
    // SAFETY: a, b and c hold n*n elements, matching m, n, k and the leading dimensions.
    unsafe { blas.gemm(cfg(), &a, &b, &mut c) }?;
    stream.synchronize()?;
    let ctx = stream.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let iterations = 20;
    start.record(stream)?;
    for _ in 0..iterations {
        // SAFETY: as above.
        unsafe { blas.gemm(cfg(), &a, &b, &mut c) }?;
    }
    end.record(stream)?;
    let ms = f64::from(start.elapsed_ms(&end)?);
    Ok(2.0 * (n as f64).powi(3) * f64::from(iterations) / (ms / 1000.0) / 1e12)
}

fn calibrate(ordinal: usize) -> anyhow::Result<Calibration> {
    let ctx = CudaContext::new(ordinal)?;
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone())?;
    let sgemm_tflops = gemm_tflops::<f32>(&stream, &blas, 4096, 1.0, 0.0)?;
    let hgemm_tflops =
        gemm_tflops::<half::f16>(&stream, &blas, 8192, half::f16::ONE, half::f16::ZERO)?;

    let bytes = 512usize << 20;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let iterations = 20;
    start.record(&stream)?;
    for _ in 0..iterations {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    end.record(&stream)?;
    let ms = f64::from(start.elapsed_ms(&end)?);
    // A copy reads and writes every byte.
    let copy_gbps = 2.0 * bytes as f64 * f64::from(iterations) / (ms / 1000.0) / 1e9;
    Ok(Calibration {
        sgemm_tflops,
        hgemm_tflops,
        copy_gbps,
        skipped: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without CUDA every GPU is skipped with the reason;
    /// with CUDA (marked GPU hosts) the figures are positive.
    #[test]
    fn calibration_never_panics() {
        let results = calibrate_all(1, &[false]);
        assert_eq!(results.len(), 1);
        match cuda_unavailable() {
            Some(why) => assert_eq!(results[0].skipped, why),
            // Libraries present: measured, or a CUDA error such as "no device".
            None => assert!(
                (results[0].skipped.is_empty() && results[0].sgemm_tflops > 0.0)
                    || results[0].skipped.starts_with("CUDA error"),
                "{:?}",
                results[0]
            ),
        }
    }
}
