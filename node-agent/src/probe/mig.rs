//! MIG re-partitioning on a GPU whose layout the agent manages
//! (`--manage-mig`): making sure the instance a replica is assigned exists.
//!
//! One algorithm, [`ensure_instance`], over a narrow [`MigDriver`]: NVML
//! on hardware ([`super::nvml::NvmlProbe`]), the simulated fleet otherwise.
//! Instances in the new one's way are destroyed only when nothing uses
//! them; if the new instance then cannot be created, the destroyed ones are
//! created again where they were (rollback), and the error says what was
//! tried and what the GPU holds now.

use super::ProbeError;

/// A GPU instance as the driver lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// `<g>g.<mem>gb`.
    pub profile: String,
    /// First memory slice and how many it spans.
    pub start: u32,
    pub size: u32,
    /// UUID of its MIG device (what `CUDA_VISIBLE_DEVICES` names).
    pub uuid: String,
    /// A process runs on it.
    pub in_use: bool,
}

impl Instance {
    fn overlaps(&self, start: u32, size: u32) -> bool {
        self.start < start + size && start < self.start + self.size
    }
}

/// What re-partitioning needs of a driver.
pub trait MigDriver: Send + Sync {
    /// The instances of GPU `gpu`.
    fn instances(&self, gpu: u32) -> Result<Vec<Instance>, ProbeError>;
    /// Memory slices an instance of `profile` spans on GPU `gpu`.
    fn profile_size(&self, gpu: u32, profile: &str) -> Result<u32, ProbeError>;
    /// Destroys `instance` (and its compute instances).
    fn destroy(&self, gpu: u32, instance: &Instance) -> Result<(), ProbeError>;
    /// Creates an instance of `profile` at memory slice `start` with one
    /// compute instance over all of it; its MIG device's UUID.
    fn create(&self, gpu: u32, profile: &str, start: u32) -> Result<String, ProbeError>;
}

/// The MIG device UUID of instance `profile@start` on GPU `gpu`, created
/// when it does not exist. Refused, with the layout unchanged, when an
/// instance in its way is in use; rolled back when creating it fails.
pub fn ensure_instance(
    driver: &dyn MigDriver,
    gpu: u32,
    profile: &str,
    start: u32,
) -> Result<String, ProbeError> {
    let err = |message: String| ProbeError::Device {
        index: gpu,
        message,
    };
    let before = driver.instances(gpu)?;
    if let Some(i) = before
        .iter()
        .find(|i| i.profile == profile && i.start == start)
    {
        return Ok(i.uuid.clone());
    }
    let size = driver.profile_size(gpu, profile)?;
    let in_way: Vec<&Instance> = before.iter().filter(|i| i.overlaps(start, size)).collect();
    if let Some(busy) = in_way.iter().find(|i| i.in_use) {
        return Err(err(format!(
            "MIG instance {profile}@{start} overlaps instance {}@{} ({}), which a process uses; drain it first",
            busy.profile, busy.start, busy.uuid
        )));
    }
    let mut destroyed: Vec<&Instance> = Vec::new();
    let mut failure = None;
    for i in &in_way {
        match driver.destroy(gpu, i) {
            Ok(()) => destroyed.push(i),
            Err(e) => {
                failure = Some(format!(
                    "destroying instance {}@{} ({}) failed: {e}",
                    i.profile, i.start, i.uuid
                ));
                break;
            }
        }
    }
    let why = match failure {
        None => match driver.create(gpu, profile, start) {
            Ok(uuid) => return Ok(uuid),
            Err(e) => format!("creating {profile}@{start} failed: {e}"),
        },
        Some(why) => why,
    };
    // roll back: the destroyed instances where they were
    let mut lost = Vec::new();
    for i in destroyed {
        if let Err(e) = driver.create(gpu, &i.profile, i.start) {
            lost.push(format!("{}@{} ({e})", i.profile, i.start));
        }
    }
    if lost.is_empty() {
        Err(err(format!(
            "{why}; the instances destroyed for it were created again (the layout is as it was)"
        )))
    } else {
        Err(err(format!(
            "{why}; and creating again the instances destroyed for it failed: {} — recreate them with nvidia-smi mig",
            lost.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSpec;
    use crate::probe::sim::SimFleet;
    use crate::probe::GpuProbe;

    fn layout(fleet: &SimFleet) -> Vec<(String, Option<u32>)> {
        let mut l: Vec<(String, Option<u32>)> = fleet.inventory().unwrap().gpus[0]
            .mig_devices
            .iter()
            .map(|d| (d.profile.clone(), d.start))
            .collect();
        l.sort();
        l
    }

    #[test]
    fn an_instance_replaces_unused_ones_in_its_way_and_rolls_back_when_it_cannot_be_made() {
        let fleet = SimFleet::new(
            "n",
            FleetSpec::from_flag("a100-80gb:1:mig=1g.10gb+1g.10gb").unwrap(),
        )
        .unwrap();
        let first = layout(&fleet);
        assert_eq!(first.len(), 2, "{first:?}");
        // creating the 3g instance fails after the 1g ones in its way are
        // gone: they come back where they were
        fleet.fail_next_mig_create("injected: out of resources");
        let e = ensure_instance(&fleet, 0, "3g.40gb", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("injected") && e.contains("created again"), "{e}");
        assert_eq!(layout(&fleet), first);
        // without the fault it is made, and asked again it is the same one
        let uuid = ensure_instance(&fleet, 0, "3g.40gb", 0).unwrap();
        assert_eq!(ensure_instance(&fleet, 0, "3g.40gb", 0).unwrap(), uuid);
        assert!(layout(&fleet).contains(&("3g.40gb".into(), Some(0))));
        // an instance in use is never destroyed
        fleet
            .set_owner_load_on(0, Some(&uuid), "replica", 1 << 30, 0, 1)
            .unwrap();
        let before = layout(&fleet);
        let e = ensure_instance(&fleet, 0, "7g.80gb", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a process uses"), "{e}");
        assert_eq!(layout(&fleet), before);
    }

    /// A driver whose destroy fails on the second instance.
    struct Stubborn(std::sync::Mutex<Vec<Instance>>);

    impl MigDriver for Stubborn {
        fn instances(&self, _: u32) -> Result<Vec<Instance>, ProbeError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn profile_size(&self, _: u32, _: &str) -> Result<u32, ProbeError> {
            Ok(4)
        }
        fn destroy(&self, gpu: u32, i: &Instance) -> Result<(), ProbeError> {
            let mut all = self.0.lock().unwrap();
            if i.start == 1 {
                return Err(ProbeError::Device {
                    index: gpu,
                    message: "busy".into(),
                });
            }
            all.retain(|x| x != i);
            Ok(())
        }
        fn create(&self, _: u32, profile: &str, start: u32) -> Result<String, ProbeError> {
            self.0.lock().unwrap().push(Instance {
                profile: profile.into(),
                start,
                size: 1,
                uuid: format!("MIG-again-{start}"),
                in_use: false,
            });
            Ok(format!("MIG-again-{start}"))
        }
    }

    #[test]
    fn a_failed_destroy_puts_back_what_was_destroyed() {
        let one = |start: u32| Instance {
            profile: "1g.10gb".into(),
            start,
            size: 1,
            uuid: format!("MIG-{start}"),
            in_use: false,
        };
        let d = Stubborn(std::sync::Mutex::new(vec![one(0), one(1)]));
        let e = ensure_instance(&d, 0, "4g.40gb", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("destroying instance 1g.10gb@1"), "{e}");
        let mut starts: Vec<u32> = d.0.lock().unwrap().iter().map(|i| i.start).collect();
        starts.sort();
        assert_eq!(starts, vec![0, 1], "the first one made again");
    }
}
