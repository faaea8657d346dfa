//! The NVML probe: the real GPUs, through libnvidia-ml loaded at run time.
//!
//! One `Nvml` handle for the life of the agent; devices are looked up by
//! index on each call (a `Device` borrows the handle). Queries a GPU does not
//! support (ECC on consumer cards, MIG on non-MIG parts, NVLink on PCIe
//! cards) are left empty rather than failing the whole probe. Where the
//! library or the driver is missing, [`NvmlProbe::new`] returns a clear error;
//! nothing here panics.

use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::{GpuInfo, GpuProbe, GpuSample, Inventory, MigDeviceInfo, ProbeError};
use crate::catalog;

/// NVLink links a GPU can have (NVML_NVLINK_MAX_LINKS).
const MAX_NVLINK_LINKS: u32 = 18;

pub struct NvmlProbe {
    nvml: Nvml,
}

fn device_err(index: u32) -> impl Fn(NvmlError) -> ProbeError {
    move |e| ProbeError::Device {
        index,
        message: e.to_string(),
    }
}

impl NvmlProbe {
    /// Loads libnvidia-ml and initialises NVML.
    pub fn new() -> Result<NvmlProbe, ProbeError> {
        let nvml = Nvml::init().map_err(|e| {
            let why = match &e {
                NvmlError::LibloadingError(_) => {
                    "the NVIDIA driver library libnvidia-ml.so.1 was not found: this host has no NVIDIA driver installed (or it is not on the library path); install the driver, or run the agent with --probe simulated"
                        .to_string()
                }
                NvmlError::DriverNotLoaded => {
                    "libnvidia-ml is installed but the NVIDIA kernel driver is not loaded; load it (nvidia-smi should work) or run with --probe simulated".to_string()
                }
                NvmlError::NoPermission => "no permission to use NVML; run the agent as a user that can open /dev/nvidia*".to_string(),
                other => format!("NVML failed to initialise: {other}"),
            };
            ProbeError::Unavailable(why)
        })?;
        Ok(NvmlProbe { nvml })
    }

    pub(super) fn nvml(&self) -> &Nvml {
        &self.nvml
    }

    fn gpu_info(&self, index: u32, device: &Device) -> Result<GpuInfo, ProbeError> {
        let err = device_err(index);
        let name = device.name().map_err(&err)?;
        let memory = device.memory_info().map_err(&err)?;
        let cc = device.cuda_compute_capability().map_err(&err)?;
        let mig_enabled = device.mig_mode().map(|m| m.current == 1).unwrap_or(false);
        let mut mig_devices = Vec::new();
        if mig_enabled {
            let slots = device.mig_device_count().unwrap_or(0);
            for slot in 0..slots {
                // Empty slots answer NotFound.
                let Ok(mig) = device.mig_device_by_index(slot) else {
                    continue;
                };
                let mig_name = mig.name().unwrap_or_default();
                mig_devices.push(MigDeviceInfo {
                    uuid: mig.uuid().unwrap_or_default(),
                    profile: mig_name.rsplit(' ').next().unwrap_or_default().to_string(),
                    start: None,
                    memory_bytes: mig.memory_info().map(|m| m.total).unwrap_or(0),
                });
            }
        }
        let mut nvlink_peers = Vec::new();
        for link in 0..MAX_NVLINK_LINKS {
            let l = device.link_wrapper_for(link);
            if l.is_active().unwrap_or(false) {
                if let Ok(remote) = l.remote_pci_info() {
                    if !nvlink_peers.contains(&remote.bus_id) {
                        nvlink_peers.push(remote.bus_id);
                    }
                }
            }
        }
        Ok(GpuInfo {
            index,
            uuid: device.uuid().map_err(&err)?,
            gpu_type: catalog::recognise(&name)
                .map_or("unknown", |t| t.key)
                .to_string(),
            name,
            memory_bytes: memory.total,
            compute_capability: (cc.major.max(0) as u32, cc.minor.max(0) as u32),
            mig_enabled,
            mig_devices,
            nvlink_peers,
            pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
            ecc_enabled: device.is_ecc_enabled().ok().map(|e| e.currently_enabled),
            power_limit_watts: device
                .enforced_power_limit()
                .map(|mw| mw / 1000)
                .unwrap_or(0),
        })
    }
}

impl GpuProbe for NvmlProbe {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<Inventory, ProbeError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| ProbeError::Unavailable(format!("NVML device count: {e}")))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(device_err(index))?;
            gpus.push(self.gpu_info(index, &device)?);
        }
        Ok(Inventory {
            driver_version: self.nvml.sys_driver_version().unwrap_or_default(),
            gpus,
        })
    }

    fn sample(&self) -> Result<Vec<GpuSample>, ProbeError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| ProbeError::Unavailable(format!("NVML device count: {e}")))?;
        let mut samples = Vec::new();
        for index in 0..count {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(device_err(index))?;
            samples.push(GpuSample {
                index,
                memory_used_bytes: d.memory_info().map(|m| m.used).map_err(device_err(index))?,
                // Utilization is not reported while MIG is on; 0 then.
                utilization: d.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                power_watts: d.power_usage().map(|mw| mw / 1000).unwrap_or(0),
                sm_clock_mhz: d.clock_info(Clock::SM).unwrap_or(0),
                ecc_uncorrected: d
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .unwrap_or(0),
                processes: d
                    .running_compute_processes()
                    .map(|p| p.len() as u32)
                    .unwrap_or(0),
            });
        }
        Ok(samples)
    }

    fn process_memory(&self) -> Result<std::collections::HashMap<u32, u64>, ProbeError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let count = self
            .nvml
            .device_count()
            .map_err(|e| ProbeError::Unavailable(format!("NVML device count: {e}")))?;
        let mut used = std::collections::HashMap::new();
        for index in 0..count {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(device_err(index))?;
            for p in d.running_compute_processes().map_err(device_err(index))? {
                // unavailable per process under MIG without privileges
                if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                    *used.entry(p.pid).or_insert(0u64) += bytes;
                }
            }
        }
        Ok(used)
    }
}
