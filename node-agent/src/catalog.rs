//! The GPU catalog: what each common GPU type offers.
//!
//! On real hardware NVML is the truth for memory and MIG state; the catalog
//! recognises the type from the driver's name, and feeds the simulated fleet
//! and performance estimates until measurements exist. Figures are the
//! vendor datasheets' dense (no sparsity) tensor peaks.

use talon_scheduler::mig::MigModel;

/// One GPU type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuType {
    /// Catalog key, as used in fleet specs: `h100-sxm`.
    pub key: &'static str,
    /// Name as the driver reports it.
    pub driver_name: &'static str,
    pub memory_mib: u64,
    pub bandwidth_gbps: f64,
    pub fp16_tflops: f64,
    /// 0 where the GPU has no BF16 tensor cores.
    pub bf16_tflops: f64,
    pub int8_tops: f64,
    pub power_watts: u32,
    pub idle_watts: u32,
    pub compute_capability: (u32, u32),
    /// NVLink domain across the node's GPUs of this type (SXM parts).
    pub nvlink: bool,
    /// MIG geometry, for the types that support it.
    pub mig: Option<MigModel>,
    /// Lower-case fragments that identify the type in a driver name; all
    /// must match.
    patterns: &'static [&'static str],
}

const fn t(
    key: &'static str,
    driver_name: &'static str,
    memory_gib: u64,
    bandwidth_gbps: f64,
    (fp16_tflops, bf16_tflops, int8_tops): (f64, f64, f64),
    (power_watts, idle_watts): (u32, u32),
    compute_capability: (u32, u32),
    nvlink: bool,
    mig: Option<MigModel>,
    patterns: &'static [&'static str],
) -> GpuType {
    GpuType {
        key,
        driver_name,
        memory_mib: memory_gib * 1024,
        bandwidth_gbps,
        fp16_tflops,
        bf16_tflops,
        int8_tops,
        power_watts,
        idle_watts,
        compute_capability,
        nvlink,
        mig,
        patterns,
    }
}

/// Every type the catalog knows. Order matters for recognition: more
/// specific patterns come first.
pub const CATALOG: &[GpuType] = &[
    t(
        "h200",
        "NVIDIA H200",
        141,
        4800.0,
        (989.0, 989.0, 1979.0),
        (700, 90),
        (9, 0),
        true,
        Some(MigModel::H200_141GB),
        &["h200"],
    ),
    t(
        "h100-pcie",
        "NVIDIA H100 PCIe",
        80,
        2000.0,
        (756.0, 756.0, 1513.0),
        (350, 60),
        (9, 0),
        false,
        Some(MigModel::H100_80GB),
        &["h100", "pcie"],
    ),
    t(
        "h100-sxm",
        "NVIDIA H100 80GB HBM3",
        80,
        3350.0,
        (989.0, 989.0, 1979.0),
        (700, 80),
        (9, 0),
        true,
        Some(MigModel::H100_80GB),
        &["h100"],
    ),
    t(
        "a100-40gb",
        "NVIDIA A100-SXM4-40GB",
        40,
        1555.0,
        (312.0, 312.0, 624.0),
        (400, 55),
        (8, 0),
        true,
        Some(MigModel::A100_40GB),
        &["a100", "40gb"],
    ),
    t(
        "a100-80gb",
        "NVIDIA A100-SXM4-80GB",
        80,
        2039.0,
        (312.0, 312.0, 624.0),
        (400, 60),
        (8, 0),
        true,
        Some(MigModel::A100_80GB),
        &["a100"],
    ),
    t(
        "a30",
        "NVIDIA A30",
        24,
        933.0,
        (165.0, 165.0, 330.0),
        (165, 30),
        (8, 0),
        false,
        Some(MigModel::A30),
        &["a30"],
    ),
    t(
        "a10",
        "NVIDIA A10",
        24,
        600.0,
        (125.0, 125.0, 250.0),
        (150, 20),
        (8, 6),
        false,
        None,
        &["a10"],
    ),
    t(
        "l40s",
        "NVIDIA L40S",
        48,
        864.0,
        (362.0, 362.0, 733.0),
        (350, 35),
        (8, 9),
        false,
        None,
        &["l40s"],
    ),
    t(
        "l4",
        "NVIDIA L4",
        24,
        300.0,
        (121.0, 121.0, 242.0),
        (72, 16),
        (8, 9),
        false,
        None,
        &["l4"],
    ),
    t(
        "t4",
        "Tesla T4",
        16,
        320.0,
        (65.0, 0.0, 130.0),
        (70, 10),
        (7, 5),
        false,
        None,
        &["t4"],
    ),
    t(
        "v100-32gb",
        "Tesla V100-SXM2-32GB",
        32,
        900.0,
        (125.0, 0.0, 0.0),
        (300, 40),
        (7, 0),
        true,
        None,
        &["v100", "32gb"],
    ),
    t(
        "v100-16gb",
        "Tesla V100-SXM2-16GB",
        16,
        900.0,
        (125.0, 0.0, 0.0),
        (300, 40),
        (7, 0),
        true,
        None,
        &["v100"],
    ),
    t(
        "rtx-4090",
        "NVIDIA GeForce RTX 4090",
        24,
        1008.0,
        (165.0, 165.0, 660.0),
        (450, 25),
        (8, 9),
        false,
        None,
        &["4090"],
    ),
];

/// The type with catalog key `key`.
pub fn by_key(key: &str) -> Option<&'static GpuType> {
    CATALOG.iter().find(|t| t.key == key)
}

/// Recognises a driver-reported name (e.g. "NVIDIA A100-SXM4-80GB").
pub fn recognise(driver_name: &str) -> Option<&'static GpuType> {
    let name = driver_name.to_ascii_lowercase();
    CATALOG
        .iter()
        .find(|t| t.patterns.iter().all(|p| name.contains(p)))
}

/// The catalog keys, for error messages.
pub fn keys() -> String {
    CATALOG.iter().map(|t| t.key).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_driver_names() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", "h100-sxm"),
            ("NVIDIA H100 PCIe", "h100-pcie"),
            ("NVIDIA H200", "h200"),
            ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
            ("NVIDIA A100 80GB PCIe", "a100-80gb"),
            ("NVIDIA L4", "l4"),
            ("NVIDIA L40S", "l40s"),
            ("Tesla T4", "t4"),
            ("Tesla V100-PCIE-16GB", "v100-16gb"),
            ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ];
        for (name, key) in cases {
            assert_eq!(recognise(name).map(|t| t.key), Some(key), "{name}");
        }
        for t in CATALOG {
            assert_eq!(
                recognise(t.driver_name).map(|r| r.key),
                Some(t.key),
                "{} must recognise itself",
                t.key
            );
        }
        assert!(recognise("Matrox G200").is_none());
    }
}
