//! What the planner needs from the cluster state: each model's replica
//! options (one per GPU type of the Ready, schedulable fleet) and the free
//! device memory they can take.

use std::collections::BTreeMap;

use talon_scheduler::capacity::{oracle, CapacityOracle, ReplicaOption};
use talon_scheduler::perf::GpuSpeed;
use talon_scheduler::types::{GpuRequest, Workload};

use crate::state::{NodeState, State};

const MIB: u64 = 1024 * 1024;

/// One GPU as the planner sees it.
#[derive(Clone, Debug)]
struct Device {
    total_mib: u64,
    free_mib: u64,
    /// Its node (by position) and NVLink domain on that node: a
    /// tensor-parallel group takes whole GPUs of one domain, as the
    /// placement engine places it.
    domain: (u32, u32),
}

/// Free device memory per GPU type, with the memory of the models being
/// planned given back (their replicas are what is being decided).
#[derive(Clone, Debug, Default)]
pub struct FreeMemory {
    by_type: BTreeMap<String, Vec<Device>>,
    /// model → MiB one replica takes.
    replica_mib: BTreeMap<String, u64>,
    /// GPU type → mean cost of one GPU per hour (its node's price shared
    /// among its GPUs).
    gpu_cost: BTreeMap<String, f64>,
}

impl FreeMemory {
    /// The fleet's free memory, counting the replicas of `planned` models
    /// as free.
    pub fn of(state: &State, planned: &BTreeMap<String, u64>) -> FreeMemory {
        let mut by_type: BTreeMap<String, Vec<Device>> = BTreeMap::new();
        let mut index: BTreeMap<(&str, u32), (String, usize)> = BTreeMap::new();
        for (k, node) in state.nodes.values().enumerate() {
            if node.state != NodeState::Ready || !node.schedulable || node.draining {
                continue;
            }
            let domains = crate::reconcile::nvlink_domains(&node.inventory.gpus);
            for (gpu, domain) in node.inventory.gpus.iter().zip(domains) {
                if gpu.mig_enabled {
                    continue;
                }
                let list = by_type.entry(gpu.gpu_type.clone()).or_default();
                index.insert(
                    (node.inventory.node_id.as_str(), gpu.index),
                    (gpu.gpu_type.clone(), list.len()),
                );
                list.push(Device {
                    total_mib: gpu.memory_bytes / MIB,
                    free_mib: gpu.memory_bytes / MIB,
                    domain: (k as u32, domain),
                });
            }
        }
        for r in state.replicas.values() {
            if planned.contains_key(&r.model) {
                continue;
            }
            let gpus = if r.gpus.is_empty() {
                vec![r.gpu]
            } else {
                r.gpus.clone()
            };
            for g in gpus {
                if let Some((t, i)) = index.get(&(r.node_id.as_str(), g)) {
                    if let Some(d) = by_type.get_mut(t).and_then(|l| l.get_mut(*i)) {
                        d.free_mib = d.free_mib.saturating_sub(r.memory_mib);
                    }
                }
            }
        }
        let mut cost: BTreeMap<String, (f64, u32)> = BTreeMap::new();
        for node in state.nodes.values() {
            let n = node.inventory.gpus.len().max(1) as f64;
            for gpu in &node.inventory.gpus {
                let e = cost.entry(gpu.gpu_type.clone()).or_insert((0.0, 0));
                e.0 += node.inventory.cost_per_hour / n;
                e.1 += 1;
            }
        }
        FreeMemory {
            by_type,
            replica_mib: planned.clone(),
            gpu_cost: cost
                .into_iter()
                .map(|(t, (sum, n))| (t, sum / f64::from(n.max(1))))
                .collect(),
        }
    }

    /// One option per GPU type: the fewest GPUs (a power of two, at most
    /// eight) whose memory holds the model; a model smaller than a GPU
    /// takes a share of one, costed by that share.
    pub fn options(&self, memory_mib: u64) -> Vec<ReplicaOption> {
        let mut out = Vec::new();
        for (gpu_type, devices) in &self.by_type {
            let Some(gpu_mib) = devices.iter().map(|d| d.total_mib).max().filter(|m| *m > 0) else {
                continue;
            };
            let per_gpu = self.gpu_cost.get(gpu_type).copied().unwrap_or(0.0);
            let tp = (1..=8u32)
                .filter(|t| t.is_power_of_two())
                .find(|t| u64::from(*t) * gpu_mib >= memory_mib);
            let Some(tp) = tp else { continue };
            let share = if tp == 1 {
                (memory_mib as f64 / gpu_mib as f64).min(1.0)
            } else {
                1.0
            };
            out.push(ReplicaOption {
                gpu_type: gpu_type.clone(),
                speed: GpuSpeed::of_model(gpu_type),
                gpu_memory_mib: gpu_mib,
                tp,
                // a shared GPU's replica pays for its share
                gpu_cost_per_hour: per_gpu.max(0.01) * share,
            });
        }
        out
    }
}

/// MiB one replica of `model` takes (a whole GPU of the option when the
/// model is not among those planned).
fn replica_mib(planned: &BTreeMap<String, u64>, model: &str, option: &ReplicaOption) -> u64 {
    planned.get(model).copied().unwrap_or(option.gpu_memory_mib)
}

/// Whether a replica of `mib` MiB on `option` takes a share of one GPU (the
/// reconciler's memory ask) rather than whole GPUs.
fn shares_a_gpu(mib: u64, option: &ReplicaOption) -> bool {
    option.tp <= 1 && mib < option.gpu_memory_mib
}

impl CapacityOracle for FreeMemory {
    fn try_take(&mut self, model: &str, option: &ReplicaOption) -> bool {
        let Some(devices) = self.by_type.get_mut(&option.gpu_type) else {
            return false;
        };
        let mib = replica_mib(&self.replica_mib, model, option);
        if shares_a_gpu(mib, option) {
            // best fit: the fullest GPU it fits on
            let pick = devices
                .iter_mut()
                .filter(|d| d.free_mib >= mib)
                .min_by_key(|d| d.free_mib);
            return match pick {
                Some(d) => {
                    d.free_mib -= mib;
                    true
                }
                None => false,
            };
        }
        // whole GPUs: a group of `tp` wholly free ones inside one NVLink
        // domain of one node (the domain with the fewest that still holds
        // it, as a best fit), never GPUs gathered across nodes or PCIe cards
        let tp = option.tp.max(1) as usize;
        let mut free_in: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for d in devices.iter().filter(|d| d.free_mib == d.total_mib) {
            *free_in.entry(d.domain).or_default() += 1;
        }
        let Some((&domain, _)) = free_in
            .iter()
            .filter(|(_, &n)| n >= tp)
            .min_by_key(|(_, &n)| n)
        else {
            return false;
        };
        for d in devices
            .iter_mut()
            .filter(|d| d.domain == domain && d.free_mib == d.total_mib)
            .take(tp)
        {
            d.free_mib = 0;
        }
        true
    }
}

/// The placement engine as the leader's capacity oracle: the fleet once
/// the replicas of every model not being planned are placed
/// ([`crate::reconcile::placed_fleet`]); a replica option fits when the
/// engine finds it a place on a node its model may take — a share of one
/// GPU sized by that GPU's memory, or a group of whole GPUs inside one
/// NVLink domain, as the reconciler will ask — and then holds it.
pub struct Placement {
    fleet: crate::reconcile::PlacedFleet,
    /// model → MiB one replica takes.
    replica_mib: BTreeMap<String, u64>,
}

impl Placement {
    /// `None` when the placement engine refuses the fleet (the caller
    /// falls back to [`FreeMemory`]).
    pub fn of(state: &State, planned: &BTreeMap<String, u64>) -> Option<Placement> {
        let apart = planned.keys().cloned().collect();
        Some(Placement {
            fleet: crate::reconcile::placed_fleet(state, &apart)?,
            replica_mib: planned.clone(),
        })
    }
}

impl CapacityOracle for Placement {
    fn try_take(&mut self, model: &str, option: &ReplicaOption) -> bool {
        let mib = replica_mib(&self.replica_mib, model, option);
        let request = if shares_a_gpu(mib, option) {
            GpuRequest::Memory { mib }
        } else {
            GpuRequest::Whole {
                count: option.tp.max(1),
            }
        };
        let mut w = Workload::new(model, 0, 0, request);
        w.gpu_types = vec![option.gpu_type.clone()];
        let may = self.fleet.eligible.get(model);
        oracle::take(&mut self.fleet.state, &w, |i| {
            may.is_none_or(|m| m.get(i).copied().unwrap_or(false))
        })
        .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::inventory;
    use crate::state::{Command, Request};

    fn option(gpu_type: &str, tp: u32) -> ReplicaOption {
        ReplicaOption {
            gpu_type: gpu_type.into(),
            speed: GpuSpeed::of_model(gpu_type),
            gpu_memory_mib: 80 * 1024,
            tp,
            gpu_cost_per_hour: 1.0,
        }
    }

    /// `gpus` GPUs of `ty` on node `id`, all on one NVSwitch (`nvlink`) or
    /// PCIe cards.
    fn node(state: &mut State, id: &str, ty: &str, gpus: usize, nvlink: bool) {
        let mut inv = inventory(id, &vec![(ty, 80); gpus]);
        if nvlink {
            for g in &mut inv.gpus {
                g.nvlink_peers = vec![format!("switch-{id}")];
            }
        }
        let index = state.nodes.len() as u64 + 1;
        state.apply(
            index,
            &Request {
                at_ms: index,
                actor: "t".into(),
                command: Command::RegisterNode(inv),
            },
        );
    }

    #[test]
    fn a_tensor_parallel_group_takes_one_nvlink_domain_of_one_node() {
        let mut state = State::default();
        node(&mut state, "a", "h100-sxm", 2, true);
        node(&mut state, "b", "h100-sxm", 2, true);
        node(&mut state, "c", "l4", 4, false);
        let mut oracle = FreeMemory::of(&state, &BTreeMap::new());
        // four free H100s, but two per node: no group of four
        assert!(!oracle.try_take("m", &option("h100-sxm", 4)));
        // two groups of two, then none
        assert!(oracle.try_take("m", &option("h100-sxm", 2)));
        assert!(oracle.try_take("m", &option("h100-sxm", 2)));
        assert!(!oracle.try_take("m", &option("h100-sxm", 2)));
        // four PCIe cards are four domains: one GPU each, no pair
        assert!(!oracle.try_take("m", &option("l4", 2)));
        assert!(oracle.try_take("m", &option("l4", 1)));
    }

    #[test]
    fn the_placement_oracle_sees_what_other_models_hold_and_where_a_model_may_go() {
        use crate::reconcile::tests::{converge, model, run};
        let (mut state, mut i) = (State::default(), 0);
        node(&mut state, "a", "h100-sxm", 2, true);
        node(&mut state, "b", "h100-sxm", 2, true);
        i += state.nodes.len() as u64;
        // another model holds one GPU of a (60 GB of 80)
        run(&mut state, &mut i, model("other", 60_000, 1));
        run(&mut state, &mut i, model("m", 100_000, 1));
        converge(&mut state, &mut i);
        let planned = BTreeMap::from([("m".to_string(), 100_000u64)]);
        let mut oracle = Placement::of(&state, &planned).unwrap();
        // one whole pair is left (on the node the other model is not on);
        // m's own replica counts as free
        assert!(oracle.try_take("m", &option("h100-sxm", 2)));
        assert!(!oracle.try_take("m", &option("h100-sxm", 2)));
        // the other model's node has one whole GPU free
        assert!(oracle.try_take("m", &option("h100-sxm", 1)));
        assert!(!oracle.try_take("m", &option("h100-sxm", 1)));
        // a node-selector no node matches: nowhere
        run(
            &mut state,
            &mut i,
            Command::UpdateModelLabels {
                name: "m".into(),
                set: BTreeMap::from([("node-selector".to_string(), "zone=z9".to_string())]),
                remove: Vec::new(),
            },
        );
        let mut oracle = Placement::of(&state, &planned).unwrap();
        assert!(!oracle.try_take("m", &option("h100-sxm", 1)));
    }
}
