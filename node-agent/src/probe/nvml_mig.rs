//! MIG instances through NVML: the [`MigDriver`] of real GPUs.
//!
//! nvml-wrapper has no safe calls for GPU and compute instances, so these
//! go through its raw library table (nvml-wrapper-sys), each function
//! looked up before it is called: a driver too old to have one gives an
//! error that names it, never a panic. Creating and destroying instances
//! needs root (or the MIG capability devices) and a GPU in MIG mode.
//!
//! Untested on hardware in this repository's CI (it has no GPU, and the
//! GPU lent for device checks may not be re-partitioned); the algorithm
//! around it is tested on the simulated driver.

use std::os::raw::c_uint;
use std::ptr;

use nvml_wrapper_sys::bindings as sys;

use super::mig::{Instance, MigDriver};
use super::nvml::NvmlProbe;
use super::ProbeError;

/// NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2).
fn profile_info_v2_version() -> c_uint {
    (std::mem::size_of::<sys::nvmlGpuInstanceProfileInfo_v2_t>() as c_uint) | (2 << 24)
}

fn nvml_err(index: u32, call: &str, code: sys::nvmlReturn_t) -> ProbeError {
    let hint = match code {
        sys::nvmlReturn_enum_NVML_ERROR_NO_PERMISSION => {
            ": run the agent as root (or with the MIG capability devices) to re-partition MIG"
        }
        sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES => {
            ": the GPU has no room for it there"
        }
        sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED => ": the GPU or driver does not support it",
        _ => "",
    };
    ProbeError::Device {
        index,
        message: format!("{call} returned NVML error {code}{hint}"),
    }
}

/// Looks up `$name` in the library table, or says which call is missing.
macro_rules! call {
    ($lib:expr, $index:expr, $name:ident) => {
        $lib.$name.as_ref().map_err(|e| ProbeError::Device {
            index: $index,
            message: format!(
                "this NVIDIA driver has no {} ({e}); upgrade the driver to manage MIG",
                stringify!($name)
            ),
        })?
    };
}

impl NvmlProbe {
    /// (NVML profile id, slices of memory, name) of every GPU instance
    /// profile GPU `index` supports.
    fn gpu_instance_profiles(
        &self,
        index: u32,
    ) -> Result<Vec<(c_uint, c_uint, String)>, ProbeError> {
        let lib = self.nvml().lib();
        let device = self.device(index)?;
        let get_info = call!(lib, index, nvmlDeviceGetGpuInstanceProfileInfoV);
        let mut out = Vec::new();
        for profile in 0..sys::NVML_GPU_INSTANCE_PROFILE_COUNT {
            // SAFETY: a zeroed plain C struct with its version set, as NVML
            // expects; the device handle lives as long as `self.nvml`.
            let mut info: sys::nvmlGpuInstanceProfileInfo_v2_t = unsafe { std::mem::zeroed() };
            info.version = profile_info_v2_version();
            let code = unsafe { get_info(device.handle(), profile, &mut info) };
            if code != sys::nvmlReturn_enum_NVML_SUCCESS {
                continue; // a profile this GPU lacks
            }
            let name: String = info
                .name
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8 as char)
                .collect();
            let name = name.trim_start_matches("MIG ").to_string();
            out.push((info.id, info.sliceCount, name));
        }
        Ok(out)
    }

    /// The NVML id and compute slices of GPU instance profile `profile`.
    fn profile_id(&self, index: u32, profile: &str) -> Result<(c_uint, c_uint), ProbeError> {
        self.gpu_instance_profiles(index)?
            .into_iter()
            .find(|(_, _, name)| name == profile)
            .map(|(id, slices, _)| (id, slices))
            .ok_or_else(|| ProbeError::Device {
                index,
                message: format!("this GPU has no MIG profile {profile}"),
            })
    }

    fn device(&self, index: u32) -> Result<nvml_wrapper::Device<'_>, ProbeError> {
        self.nvml()
            .device_by_index(index)
            .map_err(|e| ProbeError::Device {
                index,
                message: e.to_string(),
            })
    }

    /// The GPU instances of GPU `index` with their NVML handles.
    fn gpu_instances(
        &self,
        index: u32,
    ) -> Result<Vec<(sys::nvmlGpuInstance_t, sys::nvmlGpuInstanceInfo_t, String)>, ProbeError> {
        let lib = self.nvml().lib();
        let device = self.device(index)?;
        let list = call!(lib, index, nvmlDeviceGetGpuInstances);
        let info_of = call!(lib, index, nvmlGpuInstanceGetInfo);
        let mut out = Vec::new();
        for (profile, _, name) in self.gpu_instance_profiles(index)? {
            let mut handles: [sys::nvmlGpuInstance_t; 8] = [ptr::null_mut(); 8];
            let mut count: c_uint = handles.len() as c_uint;
            // SAFETY: `handles` holds `count` entries for NVML to fill.
            let code = unsafe { list(device.handle(), profile, handles.as_mut_ptr(), &mut count) };
            if code != sys::nvmlReturn_enum_NVML_SUCCESS {
                continue;
            }
            for h in handles.iter().take(count as usize) {
                // SAFETY: a handle NVML just returned; a zeroed out-struct.
                let mut info: sys::nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
                let code = unsafe { info_of(*h, &mut info) };
                if code != sys::nvmlReturn_enum_NVML_SUCCESS {
                    return Err(nvml_err(index, "nvmlGpuInstanceGetInfo", code));
                }
                out.push((*h, info, name.clone()));
            }
        }
        Ok(out)
    }

    /// The UUID of GPU `index`'s MIG device on GPU instance `gi_id`, and
    /// whether a process runs on it.
    fn mig_device_of(
        &self,
        index: u32,
        gi_id: c_uint,
    ) -> Result<Option<(String, bool)>, ProbeError> {
        let lib = self.nvml().lib();
        let device = self.device(index)?;
        let instance_id = call!(lib, index, nvmlDeviceGetGpuInstanceId);
        let slots = device.mig_device_count().unwrap_or(0);
        for slot in 0..slots {
            let Ok(mig) = device.mig_device_by_index(slot) else {
                continue;
            };
            let mut id: c_uint = 0;
            // SAFETY: a MIG device handle NVML returned.
            let code = unsafe { instance_id(mig.handle(), &mut id) };
            if code == sys::nvmlReturn_enum_NVML_SUCCESS && id == gi_id {
                let uuid = mig.uuid().map_err(|e| ProbeError::Device {
                    index,
                    message: e.to_string(),
                })?;
                let busy = mig
                    .running_compute_processes()
                    .map(|p| !p.is_empty())
                    // unknown: never destroy it
                    .unwrap_or(true);
                return Ok(Some((uuid, busy)));
            }
        }
        Ok(None)
    }
}

impl MigDriver for NvmlProbe {
    fn instances(&self, index: u32) -> Result<Vec<Instance>, ProbeError> {
        let mut out = Vec::new();
        for (_, info, profile) in self.gpu_instances(index)? {
            let (uuid, in_use) = self
                .mig_device_of(index, info.id)?
                // an instance without a compute instance has no device yet
                .unwrap_or_default();
            out.push(Instance {
                profile,
                start: info.placement.start,
                size: info.placement.size,
                uuid,
                in_use,
            });
        }
        Ok(out)
    }

    fn profile_size(&self, index: u32, profile: &str) -> Result<u32, ProbeError> {
        let lib = self.nvml().lib();
        let device = self.device(index)?;
        let placements = call!(lib, index, nvmlDeviceGetGpuInstancePossiblePlacements_v2);
        let (id, _) = self.profile_id(index, profile)?;
        let mut list = [sys::nvmlGpuInstancePlacement_t { start: 0, size: 0 }; 8];
        let mut count: c_uint = list.len() as c_uint;
        // SAFETY: `list` holds `count` entries for NVML to fill.
        let code = unsafe { placements(device.handle(), id, list.as_mut_ptr(), &mut count) };
        if code != sys::nvmlReturn_enum_NVML_SUCCESS {
            return Err(nvml_err(
                index,
                "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
                code,
            ));
        }
        list.iter()
            .take(count as usize)
            .map(|p| p.size)
            .next()
            .ok_or_else(|| ProbeError::Device {
                index,
                message: format!("MIG profile {profile} has no placement on this GPU"),
            })
    }

    fn destroy(&self, index: u32, instance: &Instance) -> Result<(), ProbeError> {
        let lib = self.nvml().lib();
        let list_ci = call!(lib, index, nvmlGpuInstanceGetComputeInstances);
        let destroy_ci = call!(lib, index, nvmlComputeInstanceDestroy);
        let destroy_gi = call!(lib, index, nvmlGpuInstanceDestroy);
        let Some((gi, _, _)) = self
            .gpu_instances(index)?
            .into_iter()
            .find(|(_, info, name)| {
                *name == instance.profile && info.placement.start == instance.start
            })
        else {
            return Ok(()); // already gone
        };
        for ci_profile in 0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            let mut cis: [sys::nvmlComputeInstance_t; 8] = [ptr::null_mut(); 8];
            let mut count: c_uint = cis.len() as c_uint;
            // SAFETY: `cis` holds `count` entries; `gi` came from NVML.
            let code = unsafe { list_ci(gi, ci_profile, cis.as_mut_ptr(), &mut count) };
            if code != sys::nvmlReturn_enum_NVML_SUCCESS {
                continue;
            }
            for ci in cis.iter().take(count as usize) {
                // SAFETY: a compute instance handle NVML just returned.
                let code = unsafe { destroy_ci(*ci) };
                if code != sys::nvmlReturn_enum_NVML_SUCCESS {
                    return Err(nvml_err(index, "nvmlComputeInstanceDestroy", code));
                }
            }
        }
        // SAFETY: `gi` came from NVML and has no compute instance left.
        let code = unsafe { destroy_gi(gi) };
        if code != sys::nvmlReturn_enum_NVML_SUCCESS {
            return Err(nvml_err(index, "nvmlGpuInstanceDestroy", code));
        }
        Ok(())
    }

    fn create(&self, index: u32, profile: &str, start: u32) -> Result<String, ProbeError> {
        let lib = self.nvml().lib();
        let device = self.device(index)?;
        let create_gi = call!(lib, index, nvmlDeviceCreateGpuInstanceWithPlacement);
        let ci_info = call!(lib, index, nvmlGpuInstanceGetComputeInstanceProfileInfo);
        let create_ci = call!(lib, index, nvmlGpuInstanceCreateComputeInstance);
        let destroy_gi = call!(lib, index, nvmlGpuInstanceDestroy);
        let info_of = call!(lib, index, nvmlGpuInstanceGetInfo);
        let (id, slices) = self.profile_id(index, profile)?;
        let size = self.profile_size(index, profile)?;
        let placement = sys::nvmlGpuInstancePlacement_t { start, size };
        let mut gi: sys::nvmlGpuInstance_t = ptr::null_mut();
        // SAFETY: valid device handle, placement and out-pointer.
        let code = unsafe { create_gi(device.handle(), id, &placement, &mut gi) };
        if code != sys::nvmlReturn_enum_NVML_SUCCESS {
            return Err(nvml_err(
                index,
                "nvmlDeviceCreateGpuInstanceWithPlacement",
                code,
            ));
        }
        // one compute instance over the whole GPU instance
        let ci_profile = (0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT).find(|p| {
            // SAFETY: `gi` was just created; zeroed out-struct.
            let mut info: sys::nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            let code = unsafe {
                ci_info(
                    gi,
                    *p,
                    sys::NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                    &mut info,
                )
            };
            code == sys::nvmlReturn_enum_NVML_SUCCESS && info.sliceCount == slices
        });
        let made = ci_profile.map(|p| {
            let mut ci: sys::nvmlComputeInstance_t = ptr::null_mut();
            // SAFETY: `gi` was just created; valid out-pointer.
            unsafe { create_ci(gi, p, &mut ci) }
        });
        if made != Some(sys::nvmlReturn_enum_NVML_SUCCESS) {
            // SAFETY: `gi` was just created and holds no compute instance.
            unsafe { destroy_gi(gi) };
            return Err(match made {
                Some(code) => nvml_err(index, "nvmlGpuInstanceCreateComputeInstance", code),
                None => ProbeError::Device {
                    index,
                    message: format!("MIG profile {profile} has no compute profile over all of it"),
                },
            });
        }
        // SAFETY: `gi` was just created; zeroed out-struct.
        let mut info: sys::nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        let code = unsafe { info_of(gi, &mut info) };
        if code != sys::nvmlReturn_enum_NVML_SUCCESS {
            return Err(nvml_err(index, "nvmlGpuInstanceGetInfo", code));
        }
        self.mig_device_of(index, info.id)?
            .map(|(uuid, _)| uuid)
            .ok_or_else(|| ProbeError::Device {
                index,
                message: format!("MIG instance {profile}@{start} was made but shows no MIG device"),
            })
    }
}
