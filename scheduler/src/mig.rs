//! NVIDIA MIG: profile tables with legal placements, a packer and a layout
//! planner.
//!
//! A MIG-capable GPU is divided into memory slices (8 on A100/H100/H200, 4 on
//! A30) and compute slices (7 GPCs, 4 on A30). An instance of a profile takes
//! a fixed number of each and may only start at the memory-slice offsets the
//! hardware allows (NVIDIA MIG User Guide, "Supported MIG Profiles" and the
//! placement diagrams). Modelling an instance as a contiguous run of memory
//! slices starting at a legal offset, plus a compute budget, reproduces the
//! guide's valid combinations: e.g. on A100 `4g@0 + 3g@4` is legal (7 GPCs),
//! `3g@0 + 3g@4` is legal (6 GPCs), `1g@6` blocks a `3g@4`, and no 1g
//! instance can start in the eighth memory slice.
//!
//! Everything here is pure: tables are `const`, the packer is a small
//! exhaustive search (at most 7 instances per GPU), the planner a
//! first-fit-decreasing bin packing whose every bin is checked by the packer.

use serde::{Deserialize, Serialize};

/// One MIG profile of one GPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigProfile {
    /// NVIDIA's name, e.g. "3g.40gb".
    pub name: &'static str,
    /// Compute slices (GPCs).
    pub compute: u8,
    /// Memory slices the instance spans (contiguous from its start).
    pub mem_slices: u8,
    /// Legal start offsets, in memory slices.
    pub starts: &'static [u8],
}

impl MigProfile {
    /// Memory of an instance, GB, from the name (`3g.40gb` → 40).
    pub fn memory_gb(&self) -> u32 {
        self.name
            .rsplit('.')
            .next()
            .and_then(|m| m.trim_end_matches("gb").parse().ok())
            .unwrap_or(0)
    }

    /// Bit mask of the memory slices this profile occupies when started at `start`.
    pub fn mask_at(&self, start: u8) -> u8 {
        let run: u16 = (1u16 << self.mem_slices) - 1;
        ((run << start) & 0xFF) as u8
    }
}

/// GPU models with MIG support.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigModel {
    A30,
    A100_40GB,
    A100_80GB,
    H100_80GB,
    H100_94GB,
    H200_141GB,
}

const fn p(name: &'static str, compute: u8, mem_slices: u8, starts: &'static [u8]) -> MigProfile {
    MigProfile {
        name,
        compute,
        mem_slices,
        starts,
    }
}

const S1: &[u8] = &[0, 1, 2, 3, 4, 5, 6];
const S1W: &[u8] = &[0, 2, 4, 6];
const S2: &[u8] = &[0, 2, 4];
const S3: &[u8] = &[0, 4];
const S0: &[u8] = &[0];

static A30: [MigProfile; 3] = [
    p("1g.6gb", 1, 1, &[0, 1, 2, 3]),
    p("2g.12gb", 2, 2, &[0, 2]),
    p("4g.24gb", 4, 4, S0),
];
static A100_40: [MigProfile; 6] = [
    p("1g.5gb", 1, 1, S1),
    p("1g.10gb", 1, 2, S1W),
    p("2g.10gb", 2, 2, S2),
    p("3g.20gb", 3, 4, S3),
    p("4g.20gb", 4, 4, S0),
    p("7g.40gb", 7, 8, S0),
];
static A100_80: [MigProfile; 6] = [
    p("1g.10gb", 1, 1, S1),
    p("1g.20gb", 1, 2, S1W),
    p("2g.20gb", 2, 2, S2),
    p("3g.40gb", 3, 4, S3),
    p("4g.40gb", 4, 4, S0),
    p("7g.80gb", 7, 8, S0),
];
static H100_80: [MigProfile; 6] = [
    p("1g.10gb", 1, 1, S1),
    p("1g.20gb", 1, 2, S1W),
    p("2g.20gb", 2, 2, S2),
    p("3g.40gb", 3, 4, S3),
    p("4g.40gb", 4, 4, S0),
    p("7g.80gb", 7, 8, S0),
];
static H100_94: [MigProfile; 6] = [
    p("1g.12gb", 1, 1, S1),
    p("1g.24gb", 1, 2, S1W),
    p("2g.24gb", 2, 2, S2),
    p("3g.47gb", 3, 4, S3),
    p("4g.47gb", 4, 4, S0),
    p("7g.94gb", 7, 8, S0),
];
static H200_141: [MigProfile; 6] = [
    p("1g.18gb", 1, 1, S1),
    p("1g.35gb", 1, 2, S1W),
    p("2g.35gb", 2, 2, S2),
    p("3g.71gb", 3, 4, S3),
    p("4g.71gb", 4, 4, S0),
    p("7g.141gb", 7, 8, S0),
];

impl MigModel {
    pub const ALL: [MigModel; 6] = [
        MigModel::A30,
        MigModel::A100_40GB,
        MigModel::A100_80GB,
        MigModel::H100_80GB,
        MigModel::H100_94GB,
        MigModel::H200_141GB,
    ];

    /// The profile table of this model.
    pub fn profiles(self) -> &'static [MigProfile] {
        match self {
            MigModel::A30 => &A30,
            MigModel::A100_40GB => &A100_40,
            MigModel::A100_80GB => &A100_80,
            MigModel::H100_80GB => &H100_80,
            MigModel::H100_94GB => &H100_94,
            MigModel::H200_141GB => &H200_141,
        }
    }

    /// Compute slices (GPCs) of a whole GPU.
    pub fn compute_slices(self) -> u8 {
        match self {
            MigModel::A30 => 4,
            _ => 7,
        }
    }

    /// Memory slices of a whole GPU.
    pub fn memory_slices(self) -> u8 {
        match self {
            MigModel::A30 => 4,
            _ => 8,
        }
    }

    /// The MIG model of a GPU, from its type as the fleet names it
    /// (`a100-80gb`, `h100-sxm`, `H200`, …) and its memory; `None` for GPUs
    /// without MIG.
    pub fn for_gpu(gpu_type: &str, memory_mib: u64) -> Option<MigModel> {
        let t = gpu_type.to_ascii_lowercase();
        let gib = memory_mib / 1024;
        if t.contains("a30") {
            Some(MigModel::A30)
        } else if t.contains("a100") {
            Some(if gib <= 48 {
                MigModel::A100_40GB
            } else {
                MigModel::A100_80GB
            })
        } else if t.contains("h100") {
            Some(if gib >= 90 {
                MigModel::H100_94GB
            } else {
                MigModel::H100_80GB
            })
        } else if t.contains("h200") {
            Some(MigModel::H200_141GB)
        } else {
            None
        }
    }

    /// The smallest profile (fewest memory slices, then fewest GPCs) whose
    /// memory holds `mib`.
    pub fn profile_for_memory(self, mib: u64) -> Option<u8> {
        self.profiles()
            .iter()
            .enumerate()
            .filter(|(_, p)| u64::from(p.memory_gb()) * 1024 >= mib)
            .min_by_key(|(_, p)| (p.mem_slices, p.compute))
            .map(|(i, _)| i as u8)
    }

    /// Index of a profile by name.
    pub fn profile_index(self, name: &str) -> Option<u8> {
        self.profiles()
            .iter()
            .position(|p| p.name == name)
            .map(|i| i as u8)
    }

    /// Index of the profile with `compute` GPCs and the fewest memory slices
    /// (the "plain" profile of that size: 1g.10gb rather than 1g.20gb).
    pub fn profile_by_compute(self, compute: u8) -> Option<u8> {
        self.profiles()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.compute == compute)
            .min_by_key(|(_, p)| p.mem_slices)
            .map(|(i, _)| i as u8)
    }
}

/// Whether any model knows a profile of this name.
pub fn profile_by_name_any(name: &str) -> Option<(MigModel, u8)> {
    MigModel::ALL
        .iter()
        .find_map(|m| m.profile_index(name).map(|i| (*m, i)))
}

/// One placed MIG instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MigInstance {
    pub profile: u8,
    pub start: u8,
}

/// Occupancy of one MIG GPU: used memory slices and GPCs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MigOccupancy {
    pub mem_mask: u8,
    pub compute: u8,
}

impl MigOccupancy {
    /// Whether `profile` can start at `start` given this occupancy.
    pub fn can_place(&self, model: MigModel, profile: u8, start: u8) -> bool {
        let p = &model.profiles()[profile as usize];
        p.starts.contains(&start)
            && (start + p.mem_slices) <= model.memory_slices()
            && self.mem_mask & p.mask_at(start) == 0
            && self.compute + p.compute <= model.compute_slices()
    }

    /// The first legal start for `profile`, if any.
    pub fn first_fit(&self, model: MigModel, profile: u8) -> Option<u8> {
        let p = &model.profiles()[profile as usize];
        p.starts
            .iter()
            .copied()
            .find(|s| self.can_place(model, profile, *s))
    }

    /// The legal start for `profile` that keeps the most instances
    /// placeable afterwards (every profile at every start still legal,
    /// counted), lowest start on ties: e.g. on an empty A100 a 3g instance
    /// goes to slice 4, leaving 0-3 for two 2g or four 1g instances, where
    /// slice 0 would leave room for one 2g only.
    pub fn best_fit(&self, model: MigModel, profile: u8) -> Option<u8> {
        let p = &model.profiles()[profile as usize];
        let options = |occ: &MigOccupancy| -> usize {
            (0..model.profiles().len() as u8)
                .map(|q| {
                    model.profiles()[q as usize]
                        .starts
                        .iter()
                        .filter(|s| occ.can_place(model, q, **s))
                        .count()
                })
                .sum()
        };
        p.starts
            .iter()
            .copied()
            .filter(|s| self.can_place(model, profile, *s))
            .map(|s| {
                let mut after = *self;
                after.place(model, profile, s);
                (options(&after), s)
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, s)| s)
    }

    /// Occupy `profile` at `start`; the caller checked [`Self::can_place`].
    pub fn place(&mut self, model: MigModel, profile: u8, start: u8) {
        debug_assert!(self.can_place(model, profile, start));
        let p = &model.profiles()[profile as usize];
        self.mem_mask |= p.mask_at(start);
        self.compute += p.compute;
    }

    /// Release an instance placed earlier.
    pub fn remove(&mut self, model: MigModel, profile: u8, start: u8) {
        let p = &model.profiles()[profile as usize];
        debug_assert_eq!(self.mem_mask & p.mask_at(start), p.mask_at(start));
        self.mem_mask &= !p.mask_at(start);
        self.compute -= p.compute;
    }
}

/// Check that a set of instances is a legal layout of one GPU.
pub fn validate_layout(model: MigModel, instances: &[MigInstance]) -> Result<(), String> {
    let mut occ = MigOccupancy::default();
    for inst in instances {
        let Some(p) = model.profiles().get(inst.profile as usize) else {
            return Err(format!(
                "profile index {} unknown on {model:?}",
                inst.profile
            ));
        };
        if !occ.can_place(model, inst.profile, inst.start) {
            return Err(format!(
                "{} at slot {} is not a legal placement on {model:?} (occupied mask {:08b}, {} GPCs used)",
                p.name, inst.start, occ.mem_mask, occ.compute
            ));
        }
        occ.place(model, inst.profile, inst.start);
    }
    Ok(())
}

/// Place a multiset of profiles on one empty GPU in legal positions, or
/// `None` when no legal layout holds them all. Exhaustive over start slots
/// (largest instances first), so it never misses a layout that exists.
pub fn pack_gpu(model: MigModel, profiles: &[u8]) -> Option<Vec<MigInstance>> {
    pack_onto(model, MigOccupancy::default(), profiles)
}

/// Like [`pack_gpu`] but onto a GPU that already has `occ` in use.
pub fn pack_onto(model: MigModel, occ: MigOccupancy, profiles: &[u8]) -> Option<Vec<MigInstance>> {
    let table = model.profiles();
    let mut order: Vec<u8> = profiles.to_vec();
    order.sort_by_key(|&i| {
        let p = &table[i as usize];
        (
            std::cmp::Reverse(p.mem_slices),
            std::cmp::Reverse(p.compute),
            i,
        )
    });
    let total_compute: u32 = order
        .iter()
        .map(|&i| table[i as usize].compute as u32)
        .sum();
    if total_compute + occ.compute as u32 > model.compute_slices() as u32 {
        return None;
    }
    let mut out = Vec::with_capacity(order.len());
    if search(model, occ, &order, &mut out) {
        Some(out)
    } else {
        None
    }
}

fn search(model: MigModel, occ: MigOccupancy, rest: &[u8], out: &mut Vec<MigInstance>) -> bool {
    let Some((&first, tail)) = rest.split_first() else {
        return true;
    };
    let p = &model.profiles()[first as usize];
    for &start in p.starts {
        if occ.can_place(model, first, start) {
            let mut next = occ;
            next.place(model, first, start);
            out.push(MigInstance {
                profile: first,
                start,
            });
            if search(model, next, tail, out) {
                return true;
            }
            out.pop();
        }
    }
    false
}

/// A layout plan: one legal instance list per GPU.
pub type LayoutPlan = Vec<Vec<MigInstance>>;

/// Plan the fewest GPUs (heuristically: first-fit decreasing, each bin
/// checked exactly by [`pack_gpu`]) holding all requested instances.
/// Returns the per-GPU layouts; the position of each requested instance is
/// recoverable by profile.
pub fn plan_layout(model: MigModel, profiles: &[u8]) -> LayoutPlan {
    let table = model.profiles();
    let mut order: Vec<u8> = profiles.to_vec();
    order.sort_by_key(|&i| {
        let p = &table[i as usize];
        (
            std::cmp::Reverse(p.compute),
            std::cmp::Reverse(p.mem_slices),
            i,
        )
    });
    let mut bins: Vec<Vec<u8>> = Vec::new();
    'next: for prof in order {
        for bin in bins.iter_mut() {
            bin.push(prof);
            if pack_gpu(model, bin).is_some() {
                continue 'next;
            }
            bin.pop();
        }
        bins.push(vec![prof]);
    }
    bins.iter()
        .map(|b| pack_gpu(model, b).expect("bin was checked when filled"))
        .collect()
}

/// [`plan_layout`] for tagged instances: returns, per GPU, the tags and the
/// positions of the instances placed on it.
pub fn plan_layout_tagged<T: Copy>(
    model: MigModel,
    items: &[(T, u8)],
) -> Vec<Vec<(T, MigInstance)>> {
    let table = model.profiles();
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&k| {
        let p = &table[items[k].1 as usize];
        (
            std::cmp::Reverse(p.compute),
            std::cmp::Reverse(p.mem_slices),
            k,
        )
    });
    let mut bins: Vec<Vec<usize>> = Vec::new();
    'next: for k in order {
        for bin in bins.iter_mut() {
            bin.push(k);
            let profs: Vec<u8> = bin.iter().map(|&j| items[j].1).collect();
            if pack_gpu(model, &profs).is_some() {
                continue 'next;
            }
            bin.pop();
        }
        bins.push(vec![k]);
    }
    bins.iter()
        .map(|bin| {
            let profs: Vec<u8> = bin.iter().map(|&j| items[j].1).collect();
            let layout = pack_gpu(model, &profs).expect("bin was checked when filled");
            // match placed instances back to tags by profile
            let mut left: Vec<usize> = bin.clone();
            layout
                .into_iter()
                .map(|inst| {
                    let pos = left
                        .iter()
                        .position(|&j| items[j].1 == inst.profile)
                        .expect("every placed profile came from the bin");
                    let j = left.remove(pos);
                    (items[j].0, inst)
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(m: MigModel, n: &str) -> u8 {
        m.profile_index(n).unwrap()
    }

    #[test]
    fn a100_known_combinations() {
        let m = MigModel::A100_80GB;
        let g4 = idx(m, "4g.40gb");
        let g3 = idx(m, "3g.40gb");
        let g2 = idx(m, "2g.20gb");
        let g1 = idx(m, "1g.10gb");
        let g7 = idx(m, "7g.80gb");
        assert!(pack_gpu(m, &[g4, g3]).is_some());
        assert!(pack_gpu(m, &[g3, g3]).is_some());
        assert!(pack_gpu(m, &[g1; 7]).is_some());
        assert!(pack_gpu(m, &[g1; 8]).is_none());
        assert!(pack_gpu(m, &[g2, g2, g2, g1]).is_some());
        assert!(pack_gpu(m, &[g3, g2, g2]).is_some());
        assert!(pack_gpu(m, &[g4, g4]).is_none());
        assert!(pack_gpu(m, &[g7, g1]).is_none());
        // 3g + 3g + 1g: the second 3g must sit at 4 and covers slice 6.
        assert!(pack_gpu(m, &[g3, g3, g1]).is_none());
        // a 1g in slice 6 blocks a 3g at 4
        let layout = [
            MigInstance {
                profile: g1,
                start: 6,
            },
            MigInstance {
                profile: g3,
                start: 4,
            },
        ];
        assert!(validate_layout(m, &layout).is_err());
    }

    #[test]
    fn a30_geometry() {
        let m = MigModel::A30;
        let g1 = idx(m, "1g.6gb");
        let g2 = idx(m, "2g.12gb");
        let g4 = idx(m, "4g.24gb");
        assert!(pack_gpu(m, &[g1; 4]).is_some());
        assert!(pack_gpu(m, &[g2, g1, g1]).is_some());
        assert!(pack_gpu(m, &[g4, g1]).is_none());
    }

    #[test]
    fn planner_packs_and_every_layout_is_legal() {
        let m = MigModel::A100_80GB;
        let g3 = idx(m, "3g.40gb");
        let g4 = idx(m, "4g.40gb");
        let g1 = idx(m, "1g.10gb");
        let plan = plan_layout(m, &[g3, g4, g3, g4, g1, g1]);
        assert_eq!(plan.len(), 3);
        for gpu in &plan {
            validate_layout(m, gpu).unwrap();
        }
        let n: usize = plan.iter().map(|g| g.len()).sum();
        assert_eq!(n, 6);
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::*;

    #[test]
    fn gpus_map_to_their_mig_tables_and_memory_to_the_smallest_profile() {
        assert_eq!(
            MigModel::for_gpu("a100-80gb", 81_920),
            Some(MigModel::A100_80GB)
        );
        assert_eq!(
            MigModel::for_gpu("NVIDIA A100-SXM4-40GB", 40_960),
            Some(MigModel::A100_40GB)
        );
        assert_eq!(
            MigModel::for_gpu("h100-sxm", 81_920),
            Some(MigModel::H100_80GB)
        );
        assert_eq!(MigModel::for_gpu("l4", 24_576), None);
        let m = MigModel::A100_80GB;
        let name = |i: Option<u8>| i.map(|i| m.profiles()[i as usize].name);
        assert_eq!(name(m.profile_for_memory(8_000)), Some("1g.10gb"));
        assert_eq!(name(m.profile_for_memory(30_000)), Some("3g.40gb"));
        assert_eq!(name(m.profile_for_memory(50_000)), Some("7g.80gb"));
        assert_eq!(m.profile_for_memory(90_000), None);
    }

    #[test]
    fn best_fit_keeps_room_for_more_instances() {
        let m = MigModel::A100_80GB;
        let idx = |n: &str| m.profile_index(n).unwrap();
        let mut occ = MigOccupancy::default();
        assert_eq!(occ.best_fit(m, idx("3g.40gb")), Some(4));
        occ.place(m, idx("3g.40gb"), 4);
        for _ in 0..2 {
            let s = occ
                .best_fit(m, idx("2g.20gb"))
                .expect("two 2g fit beside it");
            occ.place(m, idx("2g.20gb"), s);
        }
        assert_eq!(occ.compute, 7);
        assert_eq!(occ.best_fit(m, idx("1g.10gb")), None);
    }
}
