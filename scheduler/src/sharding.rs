//! Sharding planner: an explicit plan for a model that fits no single device.
//!
//! Memory per layer = weights / layers + KV budget per layer. Devices are
//! grouped by NVLink domain (same node, same `nvlink_domain`, same GPU type):
//! tensor parallelism stays inside a domain, where all-reduce per layer is
//! cheap; pipeline stages span domains and nodes, where only activations
//! cross. The planner
//!
//! 1. returns a single-device plan when one device holds everything;
//! 2. otherwise builds, per domain, a tensor-parallel group of degree 1, 2,
//!    4 or 8 (the largest that the domain has), with capacity
//!    `degree × min device memory × (1 − reserve)` and speed
//!    `degree × TFLOP/s × tp_efficiency`;
//! 3. takes the fewest groups (largest capacity first, then faster, then
//!    cheaper node) whose capacity covers the model;
//! 4. splits layers across those stages in proportion to speed, capped by
//!    each stage's memory (water-filling), integers by largest remainder;
//! 5. validates the plan ([`validate`]) before returning it.

use serde::Serialize;

use crate::types::Node;

/// A model as the planner needs it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    /// Weights in MiB (parameters × bytes per parameter).
    pub weights_mib: u64,
    pub layers: u32,
    /// KV-cache budget in MiB (tokens × bytes per token), spread over layers.
    pub kv_budget_mib: u64,
}

impl ModelSpec {
    /// Memory one layer needs, MiB.
    pub fn layer_mib(&self) -> f64 {
        (self.weights_mib + self.kv_budget_mib) as f64 / self.layers.max(1) as f64
    }
    pub fn total_mib(&self) -> u64 {
        self.weights_mib + self.kv_budget_mib
    }
}

/// Planner knobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardOptions {
    /// Fraction of each device's memory kept free (activations, CUDA context).
    pub reserve: f64,
    /// Throughput of a TP group relative to the sum of its devices.
    pub tp_efficiency: f64,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            reserve: 0.1,
            tp_efficiency: 0.9,
        }
    }
}

/// One pipeline stage: a tensor-parallel group on one NVLink domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    pub node: String,
    pub gpus: Vec<u8>,
    pub tensor_parallel: u32,
    /// Layers `first..first+count`.
    pub first_layer: u32,
    pub layers: u32,
    /// Memory this stage holds per device, MiB.
    pub mib_per_device: f64,
    pub capacity_mib_per_device: f64,
}

/// A validated plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardPlan {
    pub model: String,
    pub stages: Vec<Stage>,
}

/// Dense FP16 TFLOP/s of common GPU types (datasheets); 100 when unknown.
pub fn gpu_tflops(model: &str) -> f64 {
    let m = model.to_ascii_uppercase();
    let table: [(&str, f64); 12] = [
        ("H200", 989.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("L4", 121.0),
        ("A10", 125.0),
        ("4090", 165.0),
        ("3090", 71.0),
        ("V100", 125.0),
        ("T4", 65.0),
        ("A30", 165.0),
        ("P100", 19.0),
    ];
    table
        .iter()
        .find(|(k, _)| m.contains(k))
        .map(|(_, v)| *v)
        .unwrap_or(100.0)
}

#[derive(Clone, Debug)]
struct Group {
    node: usize,
    gpus: Vec<u8>,
    cap_per_dev: f64,
    speed: f64,
    cost: f64,
}

/// Plan `model` on `nodes` (their GPUs taken as free and non-MIG).
pub fn plan(model: &ModelSpec, nodes: &[Node], opts: &ShardOptions) -> Result<ShardPlan, String> {
    if model.layers == 0 {
        return Err(format!("model {}: 0 layers", model.name));
    }
    let layer = model.layer_mib();
    // NVLink domains: (node, domain, type) -> gpu indices
    let mut groups: Vec<Group> = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        let mut domains: Vec<((u32, &str), Vec<u8>)> = Vec::new();
        for (gi, g) in n.gpus.iter().enumerate() {
            if g.mig.is_some() || g.memory_mib == 0 {
                continue;
            }
            let key = (g.nvlink_domain, g.model.as_str());
            match domains.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(gi as u8),
                None => domains.push((key, vec![gi as u8])),
            }
        }
        for ((_, ty), gpus) in domains {
            let degree = [8usize, 4, 2, 1]
                .into_iter()
                .find(|d| *d <= gpus.len())
                .unwrap_or(1);
            let gpus: Vec<u8> = gpus.into_iter().take(degree).collect();
            let min_mem = gpus
                .iter()
                .map(|&g| n.gpus[g as usize].memory_mib)
                .min()
                .unwrap_or(0) as f64;
            let eff = if degree > 1 { opts.tp_efficiency } else { 1.0 };
            groups.push(Group {
                node: ni,
                cap_per_dev: min_mem * (1.0 - opts.reserve),
                speed: degree as f64 * gpu_tflops(ty) * eff,
                gpus,
                cost: n.cost_per_hour,
            });
        }
    }
    if groups.is_empty() {
        return Err(format!("model {}: no GPU with known memory", model.name));
    }
    let cap = |g: &Group| g.cap_per_dev * g.gpus.len() as f64;
    // one device enough?
    let mut singles: Vec<(usize, u8, f64, f64)> = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        for (gi, g) in n.gpus.iter().enumerate() {
            let c = g.memory_mib as f64 * (1.0 - opts.reserve);
            if g.mig.is_none() && c >= model.total_mib() as f64 {
                singles.push((ni, gi as u8, gpu_tflops(&g.model), c));
            }
        }
    }
    let chosen: Vec<Group> = if let Some(best) = singles.iter().max_by(|a, b| {
        a.2.total_cmp(&b.2)
            .then(b.3.total_cmp(&a.3))
            .then(b.0.cmp(&a.0))
            .then(b.1.cmp(&a.1))
    }) {
        vec![Group {
            node: best.0,
            gpus: vec![best.1],
            cap_per_dev: best.3,
            speed: best.2,
            cost: nodes[best.0].cost_per_hour,
        }]
    } else {
        groups.sort_by(|a, b| {
            cap(b)
                .total_cmp(&cap(a))
                .then(b.speed.total_cmp(&a.speed))
                .then(a.cost.total_cmp(&b.cost))
                .then(a.node.cmp(&b.node))
        });
        // layers are indivisible: count capacity in whole layers
        let mut held = 0u64;
        let mut sum = 0.0;
        let mut out = Vec::new();
        for g in groups {
            if held >= model.layers as u64 {
                break;
            }
            let fits = (cap(&g) / layer).floor() as u64;
            if fits == 0 {
                continue;
            }
            held += fits;
            sum += cap(&g);
            out.push(g);
        }
        if held < model.layers as u64 {
            return Err(format!(
                "model {} needs {} MiB ({} layers of {:.0} MiB); the fleet's GPUs hold {:.0} MiB ({held} layers) at most",
                model.name,
                model.total_mib(),
                model.layers,
                layer,
                sum
            ));
        }
        out
    };
    let layers = split_layers(
        model,
        &chosen.iter().map(|g| (g.speed, cap(g))).collect::<Vec<_>>(),
    )?;
    let mut first = 0;
    let stages: Vec<Stage> = chosen
        .iter()
        .zip(&layers)
        .map(|(g, &l)| {
            let st = Stage {
                node: nodes[g.node].name.clone(),
                gpus: g.gpus.clone(),
                tensor_parallel: g.gpus.len() as u32,
                first_layer: first,
                layers: l,
                mib_per_device: l as f64 * layer / g.gpus.len() as f64,
                capacity_mib_per_device: g.cap_per_dev,
            };
            first += l;
            st
        })
        .filter(|s| s.layers > 0)
        .collect();
    let plan = ShardPlan {
        model: model.name.clone(),
        stages,
    };
    validate(&plan, model, nodes)?;
    Ok(plan)
}

/// Layers per stage: proportional to speed, capped by memory, integers.
fn split_layers(model: &ModelSpec, stages: &[(f64, f64)]) -> Result<Vec<u32>, String> {
    let l = model.layers as usize;
    let per = model.layer_mib();
    let caps: Vec<usize> = stages
        .iter()
        .map(|(_, c)| (c / per).floor() as usize)
        .collect();
    if caps.iter().sum::<usize>() < l {
        return Err(format!(
            "model {}: stages hold fewer than {l} layers",
            model.name
        ));
    }
    let mut out = vec![0usize; stages.len()];
    let mut open: Vec<usize> = (0..stages.len()).collect();
    let mut left = l;
    // water-filling on the real-valued shares, then largest remainder
    while left > 0 && !open.is_empty() {
        let speed: f64 = open.iter().map(|&i| stages[i].0).sum();
        let mut shares: Vec<(usize, f64)> = open
            .iter()
            .map(|&i| (i, left as f64 * stages[i].0 / speed))
            .collect();
        let mut capped = false;
        for (i, s) in &shares {
            let room = caps[*i] - out[*i];
            if *s >= room as f64 {
                left -= room;
                out[*i] += room;
                capped = true;
            }
        }
        if capped {
            open.retain(|&i| out[i] < caps[i]);
            continue;
        }
        let mut given = 0;
        for (i, s) in &shares {
            let f = s.floor() as usize;
            out[*i] += f;
            given += f;
        }
        let mut rest = left - given;
        shares.sort_by(|a, b| {
            (b.1 - b.1.floor())
                .total_cmp(&(a.1 - a.1.floor()))
                .then(a.0.cmp(&b.0))
        });
        for (i, _) in shares.iter().cycle() {
            if rest == 0 {
                break;
            }
            if out[*i] < caps[*i] {
                out[*i] += 1;
                rest -= 1;
            }
        }
        left = 0;
    }
    if left > 0 {
        return Err(format!("model {}: {left} layers unplaced", model.name));
    }
    Ok(out.into_iter().map(|x| x as u32).collect())
}

/// Check a plan before anything is launched: every layer exactly once and
/// in order, each stage's memory within its devices, tensor parallelism
/// within one NVLink domain of one node, no device used twice.
pub fn validate(plan: &ShardPlan, model: &ModelSpec, nodes: &[Node]) -> Result<(), String> {
    let mut next = 0;
    let mut used: Vec<(String, u8)> = Vec::new();
    for (k, s) in plan.stages.iter().enumerate() {
        if s.first_layer != next {
            return Err(format!(
                "stage {k}: starts at layer {} not {next}",
                s.first_layer
            ));
        }
        next += s.layers;
        let node = nodes
            .iter()
            .find(|n| n.name == s.node)
            .ok_or_else(|| format!("stage {k}: unknown node {}", s.node))?;
        if s.gpus.is_empty() || s.tensor_parallel as usize != s.gpus.len() {
            return Err(format!(
                "stage {k}: tensor parallel degree does not match GPUs"
            ));
        }
        let first = node
            .gpus
            .get(s.gpus[0] as usize)
            .ok_or_else(|| format!("stage {k}: gpu index out of range"))?;
        for &g in &s.gpus {
            let gpu = node
                .gpus
                .get(g as usize)
                .ok_or_else(|| format!("stage {k}: gpu {g} out of range"))?;
            if gpu.nvlink_domain != first.nvlink_domain || gpu.model != first.model {
                return Err(format!(
                    "stage {k}: tensor parallel group spans NVLink domains"
                ));
            }
            if used.contains(&(s.node.clone(), g)) {
                return Err(format!("stage {k}: gpu {g} of {} used twice", s.node));
            }
            used.push((s.node.clone(), g));
            let need = s.layers as f64 * model.layer_mib() / s.gpus.len() as f64;
            if need > gpu.memory_mib as f64 + 1e-6 {
                return Err(format!(
                    "stage {k}: {need:.0} MiB on a {} MiB device",
                    gpu.memory_mib
                ));
            }
        }
        if s.mib_per_device > s.capacity_mib_per_device + 1e-6 {
            return Err(format!("stage {k}: over the memory reserve"));
        }
    }
    if next != model.layers {
        return Err(format!("plan covers {next} of {} layers", model.layers));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Gpu;

    fn node(name: &str, model: &str, n: usize, mem: u64, domains: u32) -> Node {
        Node {
            name: name.into(),
            cpu_milli: 64_000,
            memory_mib: 512_000,
            gpus: (0..n)
                .map(|i| Gpu {
                    memory_mib: mem,
                    nvlink_domain: (i as u32) % domains.max(1),
                    ..Gpu::new(model)
                })
                .collect(),
            cost_per_hour: 1.0,
        }
    }

    #[test]
    fn small_model_one_device() {
        let m = ModelSpec {
            name: "7b".into(),
            weights_mib: 14_000,
            layers: 32,
            kv_budget_mib: 4_000,
        };
        let p = plan(
            &m,
            &[node("a", "L4", 2, 24_576, 1)],
            &ShardOptions::default(),
        )
        .unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].tensor_parallel, 1);
        assert_eq!(p.stages[0].layers, 32);
    }

    #[test]
    fn seventy_b_tp_then_pipeline() {
        // 70B fp16 ~ 140 GB + 40 GB KV on 80 GB cards: 4-way TP on one node
        let m = ModelSpec {
            name: "70b".into(),
            weights_mib: 140_000,
            layers: 80,
            kv_budget_mib: 40_000,
        };
        let nodes = [node("h", "H100", 4, 81_920, 1)];
        let p = plan(&m, &nodes, &ShardOptions::default()).unwrap();
        assert_eq!(p.stages.len(), 1);
        assert_eq!(p.stages[0].tensor_parallel, 4);
        // two nodes of 2 x A100-40GB: pipeline across, TP inside
        let m2 = ModelSpec {
            name: "30b".into(),
            weights_mib: 100_000,
            layers: 60,
            kv_budget_mib: 8_000,
        };
        let nodes = [
            node("a", "A100", 2, 40_960, 1),
            node("b", "A100", 2, 40_960, 1),
        ];
        let p = plan(&m2, &nodes, &ShardOptions::default()).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert!(p.stages.iter().all(|s| s.tensor_parallel == 2));
        assert_eq!(p.stages.iter().map(|s| s.layers).sum::<u32>(), 60);
        validate(&p, &m2, &nodes).unwrap();
    }

    #[test]
    fn layers_follow_speed_and_memory() {
        // a fast H100 and a slow T4-class card with equal memory: more layers on the H100
        let m = ModelSpec {
            name: "m".into(),
            weights_mib: 100_000,
            layers: 40,
            kv_budget_mib: 0,
        };
        let nodes = [
            node("fast", "H100", 1, 81_920, 1),
            node("slow", "T4", 4, 16_384, 4),
        ];
        let p = plan(&m, &nodes, &ShardOptions::default()).unwrap();
        let fast = p.stages.iter().find(|s| s.node == "fast").unwrap();
        assert!(fast.layers >= 20, "{p:?}");
        validate(&p, &m, &nodes).unwrap();
    }

    #[test]
    fn too_big_is_a_clear_error() {
        let m = ModelSpec {
            name: "huge".into(),
            weights_mib: 10_000_000,
            layers: 100,
            kv_budget_mib: 0,
        };
        let e = plan(
            &m,
            &[node("a", "A100", 8, 81_920, 1)],
            &ShardOptions::default(),
        )
        .unwrap_err();
        assert!(e.contains("needs"), "{e}");
    }
}
