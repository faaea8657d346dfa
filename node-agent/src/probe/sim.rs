//! A simulated fleet: GPUs that behave like the catalog types they stand for.
//!
//! Inventory comes from a [`FleetSpec`]: stable UUIDs derived from the node
//! name, MIG instances at their legal placements, NVLink peers among SXM
//! parts. Samples follow the work placed on each GPU through
//! [`SimFleet::set_load`] (executors call it): memory used is what is
//! allocated, power and temperature rise with utilization between the
//! type's idle and peak, and the SM clock is the type's boost clock when
//! busy. Nothing is random, so tests can assert exact values.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{GpuInfo, GpuProbe, GpuSample, Inventory, MigDeviceInfo, ProbeError};
use crate::fleet::{FleetSpec, ResolvedGroup, SpecError};

/// Memory the driver and context of an idle GPU hold, as seen on real GPUs.
const IDLE_MEMORY_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Clone, Debug, Default)]
struct Load {
    memory_bytes: u64,
    utilization: u32,
    processes: u32,
    /// The MIG device it runs on, if any: its memory is bounded by the
    /// device's as well as the GPU's.
    mig_device: Option<String>,
}

/// A host's simulated GPUs.
pub struct SimFleet {
    node: String,
    /// Changes only when a managed MIG layout does.
    inventory: std::sync::RwLock<Inventory>,
    /// Per GPU, the load each owner (a replica, or "manual") puts on it.
    loads: Mutex<Vec<BTreeMap<String, Load>>>,
    peaks: Vec<(u32, u32)>,
    pub spec: FleetSpec,
    /// The next MIG instance creation fails with this (a test's fault).
    mig_fault: Mutex<Option<String>>,
}

/// FNV-1a: a stable hash for deriving UUIDs from names.
fn fnv(data: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn uuid(prefix: &str, seed: &str) -> String {
    let a = fnv(seed);
    let b = fnv(&format!("{seed}/2"));
    format!(
        "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn mig_memory_bytes(profile: &str) -> u64 {
    let gb = profile
        .split('.')
        .nth(1)
        .and_then(|m| m.trim_end_matches("gb").parse::<u64>().ok())
        .unwrap_or(0);
    gb * 1024 * 1024 * 1024
}

impl SimFleet {
    /// Builds the fleet of host `node` from `spec`.
    pub fn new(node: &str, spec: FleetSpec) -> Result<SimFleet, SpecError> {
        let groups = spec.resolve()?;
        let mut gpus = Vec::new();
        let mut peaks = Vec::new();
        for (
            g,
            ResolvedGroup {
                gpu_type,
                count,
                mig,
            },
        ) in groups.iter().enumerate()
        {
            let first = gpus.len() as u32;
            let group_uuids: Vec<String> = (0..*count)
                .map(|i| uuid("GPU", &format!("{node}/{}", first + i)))
                .collect();
            for i in 0..*count {
                let index = first + i;
                let id = &group_uuids[i as usize];
                let mig_devices = mig
                    .iter()
                    .map(|(profile, placement)| MigDeviceInfo {
                        uuid: uuid(
                            "MIG",
                            &format!("{node}/{index}/{profile}@{}", placement.start),
                        ),
                        profile: profile.clone(),
                        start: Some(u32::from(placement.start)),
                        memory_bytes: mig_memory_bytes(profile),
                    })
                    .collect();
                let nvlink_peers = if gpu_type.nvlink {
                    group_uuids.iter().filter(|u| *u != id).cloned().collect()
                } else {
                    Vec::new()
                };
                gpus.push(GpuInfo {
                    index,
                    uuid: id.clone(),
                    name: gpu_type.driver_name.to_string(),
                    gpu_type: gpu_type.key.to_string(),
                    memory_bytes: gpu_type.memory_mib * 1024 * 1024,
                    compute_capability: gpu_type.compute_capability,
                    mig_enabled: !mig.is_empty(),
                    mig_devices,
                    nvlink_peers,
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x10 + g * 0x10 + i as usize),
                    ecc_enabled: Some(!gpu_type.key.starts_with("rtx")),
                    power_limit_watts: gpu_type.power_watts,
                });
                peaks.push((gpu_type.idle_watts, gpu_type.power_watts));
            }
        }
        let loads = Mutex::new(vec![BTreeMap::new(); gpus.len()]);
        Ok(SimFleet {
            node: node.to_string(),
            inventory: std::sync::RwLock::new(Inventory {
                driver_version: "simulated".into(),
                gpus,
            }),
            loads,
            peaks,
            spec,
            mig_fault: Mutex::new(None),
        })
    }

    /// Puts work on GPU `index`: memory it holds, utilization in percent,
    /// processes running. Replaces what was set before with this call.
    pub fn set_load(
        &self,
        index: u32,
        memory_bytes: u64,
        utilization: u32,
        processes: u32,
    ) -> Result<(), ProbeError> {
        self.set_owner_load(index, "manual", memory_bytes, utilization, processes)
    }

    /// Like [`Self::set_load`] for one owner (e.g. a replica): loads of
    /// different owners on one GPU add up, and must fit its memory together.
    pub fn set_owner_load(
        &self,
        index: u32,
        owner: &str,
        memory_bytes: u64,
        utilization: u32,
        processes: u32,
    ) -> Result<(), ProbeError> {
        self.set_owner_load_on(index, None, owner, memory_bytes, utilization, processes)
    }

    /// Device memory `owner` holds on GPU `index` (0: none).
    pub fn owner_memory(&self, index: u32, owner: &str) -> u64 {
        let loads = self.loads.lock().expect("load lock poisoned");
        loads
            .get(index as usize)
            .and_then(|l| l.get(owner))
            .map_or(0, |l| l.memory_bytes)
    }

    /// Every owner's memory on GPU `index`: (owner, bytes).
    pub fn owners(&self, index: u32) -> Vec<(String, u64)> {
        let loads = self.loads.lock().expect("load lock poisoned");
        loads.get(index as usize).map_or_else(Vec::new, |l| {
            l.iter().map(|(o, l)| (o.clone(), l.memory_bytes)).collect()
        })
    }

    /// Sets `owner`'s utilization on GPU `index`, its memory as it is.
    pub fn set_owner_utilization(&self, index: u32, owner: &str, utilization: u32) {
        let mut loads = self.loads.lock().expect("load lock poisoned");
        if let Some(l) = loads.get_mut(index as usize).and_then(|l| l.get_mut(owner)) {
            l.utilization = utilization.min(100);
        }
    }

    /// [`Self::set_owner_load`] on MIG device `mig_device` of GPU `index`
    /// (`None`: the whole GPU): loads on one device must also fit the
    /// device's memory together.
    pub fn set_owner_load_on(
        &self,
        index: u32,
        mig_device: Option<&str>,
        owner: &str,
        memory_bytes: u64,
        utilization: u32,
        processes: u32,
    ) -> Result<(), ProbeError> {
        let inventory = self.inventory.read().expect("inventory lock poisoned");
        let gpu = inventory
            .gpus
            .get(index as usize)
            .ok_or(ProbeError::Device {
                index,
                message: format!("no such GPU; this host has {}", inventory.gpus.len()),
            })?;
        let device_memory = match mig_device {
            None => None,
            Some(uuid) => Some(
                gpu.mig_devices
                    .iter()
                    .find(|m| m.uuid == uuid)
                    .ok_or_else(|| ProbeError::Device {
                        index,
                        message: format!("GPU {index} has no MIG device {uuid}"),
                    })?
                    .memory_bytes,
            ),
        };
        let mut loads = self.loads.lock().expect("load lock poisoned");
        let others = loads[index as usize].iter().filter(|(o, _)| *o != owner);
        let on_gpu: u64 = others.clone().map(|(_, l)| l.memory_bytes).sum();
        if on_gpu + memory_bytes + IDLE_MEMORY_BYTES > gpu.memory_bytes {
            return Err(ProbeError::Device {
                index,
                message: format!(
                    "{} bytes do not fit: {} of {} bytes of GPU memory are free",
                    memory_bytes,
                    gpu.memory_bytes.saturating_sub(IDLE_MEMORY_BYTES + on_gpu),
                    gpu.memory_bytes
                ),
            });
        }
        if let (Some(uuid), Some(limit)) = (mig_device, device_memory) {
            let on_device: u64 = others
                .filter(|(_, l)| l.mig_device.as_deref() == Some(uuid))
                .map(|(_, l)| l.memory_bytes)
                .sum();
            if on_device + memory_bytes > limit {
                return Err(ProbeError::Device {
                    index,
                    message: format!(
                        "{memory_bytes} bytes do not fit on MIG device {uuid}: {} of {limit} bytes are free",
                        limit.saturating_sub(on_device)
                    ),
                });
            }
        }
        if memory_bytes == 0 && utilization == 0 && processes == 0 {
            loads[index as usize].remove(owner);
        } else {
            loads[index as usize].insert(
                owner.to_string(),
                Load {
                    memory_bytes,
                    utilization: utilization.min(100),
                    processes,
                    mig_device: mig_device.map(str::to_string),
                },
            );
        }
        Ok(())
    }
    /// The MIG instance `profile@start` of GPU `index` (its UUID), created
    /// when it does not exist: instances in its way that no replica uses
    /// are destroyed first, and created again if it cannot be made
    /// ([`super::mig::ensure_instance`]). Refused — with the layout
    /// unchanged — when an instance in its way is in use, the GPU is not in
    /// MIG mode, or the layout would not be legal.
    pub fn ensure_mig_instance(
        &self,
        index: u32,
        profile: &str,
        start: u32,
    ) -> Result<String, ProbeError> {
        super::mig::ensure_instance(self, index, profile, start)
    }

    /// Makes the next MIG instance creation fail with `message` (the
    /// driver refusing, as it may on hardware), to exercise the rollback.
    pub fn fail_next_mig_create(&self, message: &str) {
        *self.mig_fault.lock().expect("fault lock poisoned") = Some(message.to_string());
    }

    fn mig_model(&self, index: u32) -> Result<talon_scheduler::mig::MigModel, ProbeError> {
        let device = |message: String| ProbeError::Device { index, message };
        let inventory = self.inventory.read().expect("inventory lock poisoned");
        let gpu = inventory
            .gpus
            .get(index as usize)
            .ok_or_else(|| device("no such GPU".into()))?;
        if !gpu.mig_enabled {
            return Err(device(
                "not in MIG mode; enable it (nvidia-smi -mig 1) first".into(),
            ));
        }
        crate::catalog::by_key(&gpu.gpu_type)
            .and_then(|t| t.mig)
            .ok_or_else(|| device(format!("{} has no MIG profiles", gpu.gpu_type)))
    }
}

impl super::mig::MigDriver for SimFleet {
    fn instances(&self, index: u32) -> Result<Vec<super::mig::Instance>, ProbeError> {
        let model = self.mig_model(index)?;
        let inventory = self.inventory.read().expect("inventory lock poisoned");
        let loads = self.loads.lock().expect("load lock poisoned");
        Ok(inventory.gpus[index as usize]
            .mig_devices
            .iter()
            .map(|d| super::mig::Instance {
                profile: d.profile.clone(),
                start: d.start.unwrap_or(0),
                size: model
                    .profile_index(&d.profile)
                    .map_or(8, |p| u32::from(model.profiles()[p as usize].mem_slices)),
                uuid: d.uuid.clone(),
                in_use: loads[index as usize]
                    .values()
                    .any(|l| l.mig_device.as_deref() == Some(d.uuid.as_str())),
            })
            .collect())
    }

    fn profile_size(&self, index: u32, profile: &str) -> Result<u32, ProbeError> {
        let model = self.mig_model(index)?;
        let p = model
            .profile_index(profile)
            .ok_or_else(|| ProbeError::Device {
                index,
                message: format!("{profile} is no MIG profile of {model:?}"),
            })?;
        Ok(u32::from(model.profiles()[p as usize].mem_slices))
    }

    fn destroy(&self, index: u32, instance: &super::mig::Instance) -> Result<(), ProbeError> {
        let mut inventory = self.inventory.write().expect("inventory lock poisoned");
        inventory.gpus[index as usize]
            .mig_devices
            .retain(|d| d.uuid != instance.uuid);
        Ok(())
    }

    fn create(&self, index: u32, profile: &str, start: u32) -> Result<String, ProbeError> {
        use talon_scheduler::mig::{validate_layout, MigInstance};
        let device = |message: String| ProbeError::Device { index, message };
        if let Some(fault) = self.mig_fault.lock().expect("fault lock poisoned").take() {
            return Err(device(fault));
        }
        let model = self.mig_model(index)?;
        let slot = |name: &str, at: u32| -> Option<MigInstance> {
            Some(MigInstance {
                profile: model.profile_index(name)?,
                start: u8::try_from(at).ok()?,
            })
        };
        let wanted = slot(profile, start)
            .ok_or_else(|| device(format!("{profile}@{start} is no MIG instance of {model:?}")))?;
        let mut inventory = self.inventory.write().expect("inventory lock poisoned");
        let gpu = &mut inventory.gpus[index as usize];
        let mut instances = vec![wanted];
        instances.extend(
            gpu.mig_devices
                .iter()
                .filter_map(|d| d.start.and_then(|at| slot(&d.profile, at))),
        );
        validate_layout(model, &instances).map_err(|e| {
            device(format!(
                "{profile}@{start} does not fit beside the instances there: {e}"
            ))
        })?;
        let uuid = uuid("MIG", &format!("{}/{index}/{profile}@{start}", self.node));
        gpu.mig_devices.push(MigDeviceInfo {
            uuid: uuid.clone(),
            profile: profile.to_string(),
            start: Some(start),
            memory_bytes: mig_memory_bytes(profile),
        });
        gpu.mig_devices.sort_by_key(|d| d.start);
        Ok(uuid)
    }
}

impl GpuProbe for SimFleet {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn inventory(&self) -> Result<Inventory, ProbeError> {
        Ok(self
            .inventory
            .read()
            .expect("inventory lock poisoned")
            .clone())
    }

    fn sample(&self) -> Result<Vec<GpuSample>, ProbeError> {
        let loads = self.loads.lock().expect("load lock poisoned");
        let inventory = self.inventory.read().expect("inventory lock poisoned");
        Ok(inventory
            .gpus
            .iter()
            .zip(loads.iter())
            .zip(&self.peaks)
            .map(|((gpu, owners), (idle, peak))| {
                let u = owners.values().map(|l| l.utilization).sum::<u32>().min(100);
                let memory: u64 = owners.values().map(|l| l.memory_bytes).sum();
                let processes: u32 = owners.values().map(|l| l.processes).sum();
                GpuSample {
                    index: gpu.index,
                    memory_used_bytes: IDLE_MEMORY_BYTES + memory,
                    utilization: u,
                    temperature_c: 30 + u * 45 / 100,
                    power_watts: idle + (peak - idle) * u / 100,
                    sm_clock_mhz: if u > 0 { 1980 } else { 345 },
                    ecc_uncorrected: 0,
                    processes,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn managed_mig_instances_are_created_reused_and_never_taken_from_a_replica() {
        let fleet = SimFleet::new(
            "n",
            FleetSpec::from_flag("a100-80gb:1:mig=1g.10gb").unwrap(),
        )
        .unwrap();
        let old = fleet.inventory().unwrap().gpus[0].mig_devices[0]
            .uuid
            .clone();
        // 3g@0 needs the unused 1g@0's slice: it goes
        let three = fleet.ensure_mig_instance(0, "3g.40gb", 0).unwrap();
        let devices = fleet.inventory().unwrap().gpus[0].mig_devices.clone();
        assert_eq!(devices.len(), 1);
        assert_eq!(
            (devices[0].uuid.as_str(), devices[0].memory_bytes),
            (three.as_str(), 40 << 30)
        );
        assert_ne!(three, old);
        assert_eq!(
            fleet.ensure_mig_instance(0, "3g.40gb", 0).unwrap(),
            three,
            "reused"
        );
        // in use, it is never destroyed for another instance
        fleet
            .set_owner_load_on(0, Some(&three), "r", 1 << 30, 0, 1)
            .unwrap();
        let err = fleet
            .ensure_mig_instance(0, "4g.40gb", 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("which a process uses"), "{err}");
        // beside it, fine; an illegal start or unknown profile is refused
        let two = fleet.ensure_mig_instance(0, "2g.20gb", 4).unwrap();
        assert!(fleet.ensure_mig_instance(0, "2g.20gb", 5).is_err());
        assert!(fleet.ensure_mig_instance(0, "3g.47gb", 4).is_err());
        // an unused instance in the way goes; a used one stays
        let three_b = fleet.ensure_mig_instance(0, "3g.40gb", 4).unwrap();
        let uuids: Vec<String> = fleet.inventory().unwrap().gpus[0]
            .mig_devices
            .iter()
            .map(|d| d.uuid.clone())
            .collect();
        assert_eq!(
            uuids,
            vec![three.clone(), three_b.clone()],
            "2g@4 ({two}) was unused"
        );
        fleet
            .set_owner_load_on(0, Some(&three_b), "s", 1 << 30, 0, 1)
            .unwrap();
        assert!(fleet
            .ensure_mig_instance(0, "2g.20gb", 4)
            .unwrap_err()
            .to_string()
            .contains("which a process uses"));
        let plain = SimFleet::new("p", FleetSpec::from_flag("a100-80gb:1").unwrap()).unwrap();
        assert!(plain
            .ensure_mig_instance(0, "3g.40gb", 0)
            .unwrap_err()
            .to_string()
            .contains("not in MIG mode"));
    }

    use super::*;

    #[test]
    fn inventory_is_stable_and_samples_follow_the_load() {
        let spec = FleetSpec::from_flag("h100-sxm:2:mig=3g.40gb+3g.40gb,l4:1").unwrap();
        let a = SimFleet::new("node-a", spec.clone()).unwrap();
        let b = SimFleet::new("node-a", spec.clone()).unwrap();
        let c = SimFleet::new("node-b", spec).unwrap();
        let inv = a.inventory().unwrap();
        assert_eq!(inv, b.inventory().unwrap(), "same node, same inventory");
        assert_ne!(inv.gpus[0].uuid, c.inventory().unwrap().gpus[0].uuid);
        assert_eq!(inv.gpus.len(), 3);
        assert_eq!(inv.gpus[0].mig_devices.len(), 2);
        assert_eq!(inv.gpus[0].mig_devices[1].start, Some(4));
        assert_eq!(inv.gpus[0].nvlink_peers, vec![inv.gpus[1].uuid.clone()]);
        assert!(inv.gpus[2].nvlink_peers.is_empty());
        assert!(
            inv.gpus[0].uuid.starts_with("GPU-")
                && inv.gpus[0].mig_devices[0].uuid.starts_with("MIG-")
        );

        let idle = a.sample().unwrap();
        assert_eq!(idle[2].utilization, 0);
        assert_eq!(idle[2].power_watts, 16);
        a.set_load(2, 10 << 30, 80, 1).unwrap();
        let busy = a.sample().unwrap();
        assert_eq!(busy[2].memory_used_bytes, IDLE_MEMORY_BYTES + (10 << 30));
        assert_eq!(
            (busy[2].utilization, busy[2].power_watts, busy[2].processes),
            (80, 16 + 56 * 80 / 100, 1)
        );
        assert!(
            a.set_load(2, 30 << 30, 10, 1).is_err(),
            "more memory than an L4 has"
        );
        assert!(a.set_load(9, 0, 0, 0).is_err());
    }
}
