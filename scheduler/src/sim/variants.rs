//! Trace variants: openb task lists with constraints the shipped traces lack.
//!
//! None of the shipped openb traces sets `gpu_spec`, and only two raise the
//! share of multi-GPU tasks, so a policy tuned on them has never met a
//! type-constrained task and barely a gang. `talon-sim variant` derives new
//! task lists from any trace, reproducibly (one seed):
//!
//! * `--gpu-spec F`: a fraction `F` of the GPU tasks get a `gpu_spec`. The
//!   type is drawn with probability proportional to the GPUs of that type
//!   on nodes that could host the task alone (enough GPUs and CPU), the way
//!   a constrained job asks for the hardware that exists; with probability
//!   `--spec-pair` the spec names two types (`"V100M16|V100M32"`), the
//!   second drawn the same way.
//! * `--multi-gpu F`: a fraction `F` of the single-GPU tasks become gangs
//!   of 2, 4 or 8 whole GPUs (weights 3 : 3 : 4, as in multigpu50), whose
//!   CPU and memory are those of a gang of that size drawn from the source
//!   trace (or the task's scaled by its GPU demand when the trace has none).
//!
//! The output is an ordinary `openb_pod_list_NAME.csv` (with a `gpu_spec`
//! column), so `talon-sim b1 --trace NAME --data-dir DIR` runs it like any
//! shipped trace.

use std::fmt::Write as _;
use std::path::Path;

use super::openb::OpenbTask;
use crate::rng::Rng;
use crate::types::{Node, MILLI};

/// How to derive a variant.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantSpec {
    /// Fraction of GPU tasks that get a `gpu_spec`.
    pub gpu_spec: f64,
    /// Of those, the fraction whose spec names two types.
    pub spec_pair: f64,
    /// Fraction of single-GPU tasks turned into 2/4/8-GPU gangs.
    pub multi_gpu: f64,
    pub seed: u64,
}

impl VariantSpec {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("--gpu-spec", self.gpu_spec),
            ("--spec-pair", self.spec_pair),
            ("--multi-gpu", self.multi_gpu),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be a fraction in 0..=1, got {v}"));
            }
        }
        Ok(())
    }
}

/// GPUs of each type on nodes that could host `t` alone.
fn type_weights(nodes: &[Node], t: &OpenbTask) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for n in nodes {
        let Some(first) = n.gpus.first() else {
            continue;
        };
        if (n.gpus.len() as u32) < t.num_gpu || n.cpu_milli < t.cpu_milli {
            continue;
        }
        match out.iter_mut().find(|(m, _)| *m == first.model) {
            Some(e) => e.1 += n.gpus.len() as u64,
            None => out.push((first.model.clone(), n.gpus.len() as u64)),
        }
    }
    out.sort();
    out
}

fn draw(rng: &mut Rng, weights: &[(String, u64)]) -> Option<String> {
    let total: u64 = weights.iter().map(|w| w.1).sum();
    if total == 0 {
        return None;
    }
    let mut k = rng.below(total);
    for (m, w) in weights {
        if k < *w {
            return Some(m.clone());
        }
        k -= w;
    }
    None
}

/// Derive a variant of `tasks` on the cluster `nodes`.
pub fn derive(nodes: &[Node], tasks: &[OpenbTask], spec: &VariantSpec) -> Vec<OpenbTask> {
    let mut rng = Rng::new(spec.seed);
    let gangs = |n: u32| -> Vec<(u64, u64)> {
        tasks
            .iter()
            .filter(|t| t.num_gpu == n)
            .map(|t| (t.cpu_milli, t.memory_mib))
            .collect()
    };
    let like: [(u32, Vec<(u64, u64)>); 3] = [(2, gangs(2)), (4, gangs(4)), (8, gangs(8))];
    let unit = |rng: &mut Rng| rng.below(1 << 24) as f64 / (1u64 << 24) as f64;
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let mut t = t.clone();
        if t.num_gpu == 1 && unit(&mut rng) < spec.multi_gpu {
            let n = match rng.below(10) {
                0..=2 => 2,
                3..=5 => 4,
                _ => 8,
            };
            let scale = if t.gpu_milli >= MILLI {
                n as u64
            } else {
                // a share becomes n whole GPUs: scale by GPU demand
                (n as u64 * MILLI as u64).div_ceil(t.gpu_milli.max(1) as u64)
            };
            let same = &like.iter().find(|(k, _)| *k == n).expect("2, 4 or 8").1;
            let (cpu, mem) = if same.is_empty() {
                (
                    t.cpu_milli.saturating_mul(scale).min(96_000),
                    t.memory_mib.saturating_mul(scale).min(786_432),
                )
            } else {
                same[rng.below(same.len() as u64) as usize]
            };
            t.num_gpu = n;
            t.gpu_milli = MILLI;
            t.cpu_milli = cpu;
            t.memory_mib = mem;
        }
        if t.num_gpu > 0 && t.gpu_spec.is_empty() && unit(&mut rng) < spec.gpu_spec {
            let weights = type_weights(nodes, &t);
            if let Some(first) = draw(&mut rng, &weights) {
                let mut names = vec![first];
                if unit(&mut rng) < spec.spec_pair {
                    let rest: Vec<(String, u64)> = weights
                        .iter()
                        .filter(|(m, _)| *m != names[0])
                        .cloned()
                        .collect();
                    if let Some(second) = draw(&mut rng, &rest) {
                        names.push(second);
                    }
                }
                names.sort();
                t.gpu_spec = names.join("|");
            }
        }
        out.push(t);
    }
    out
}

/// The task list as an openb CSV (columns the loader reads).
pub fn to_csv(tasks: &[OpenbTask]) -> String {
    let mut s = String::from("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n");
    for t in tasks {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{}",
            t.name, t.cpu_milli, t.memory_mib, t.num_gpu, t.gpu_milli, t.gpu_spec
        );
    }
    s
}

/// `talon-sim variant`: read `from` under `data_dir/openb`, write
/// `out_dir/openb/openb_pod_list_<name>.csv` (and copy the node list, so
/// that `out_dir` is a data directory B1 can run on).
pub fn run_cli(
    data_dir: &Path,
    from: &str,
    name: &str,
    spec: &VariantSpec,
    out_dir: &Path,
) -> Result<(), String> {
    spec.validate()?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!(
            "--name {name:?}: use letters, digits and '-' (it becomes openb_pod_list_NAME.csv)"
        ));
    }
    let node_file = data_dir.join("openb/openb_node_list_gpu_node.csv");
    let nodes = super::openb::load_nodes(&node_file).map_err(|e| e.to_string())?;
    let mut tasks =
        super::openb::load_tasks(&data_dir.join(format!("openb/openb_pod_list_{from}.csv")))
            .map_err(|e| e.to_string())?;
    tasks.sort_by(|a, b| a.name.cmp(&b.name));
    let derived = derive(&nodes, &tasks, spec);
    let dir = out_dir.join("openb");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let target = dir.join("openb_node_list_gpu_node.csv");
    if target != node_file {
        std::fs::copy(&node_file, &target).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    let path = dir.join(format!("openb_pod_list_{name}.csv"));
    std::fs::write(&path, to_csv(&derived)).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec_n = derived.iter().filter(|t| !t.gpu_spec.is_empty()).count();
    let gang_n = derived.iter().filter(|t| t.num_gpu > 1).count();
    eprintln!(
        "variant {name}: {} tasks, {spec_n} with gpu_spec, {gang_n} multi-GPU -> {}",
        derived.len(),
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Gpu;

    fn node(model: &str, gpus: usize, cpu: u64) -> Node {
        Node {
            name: format!("{model}-{gpus}"),
            cpu_milli: cpu,
            memory_mib: 1 << 20,
            gpus: (0..gpus).map(|_| Gpu::new(model)).collect(),
            cost_per_hour: 0.0,
        }
    }

    fn task(i: usize, num_gpu: u32, milli: u32) -> OpenbTask {
        OpenbTask {
            name: format!("t{i:04}"),
            cpu_milli: 4000,
            memory_mib: 1000,
            num_gpu,
            gpu_milli: milli,
            gpu_spec: String::new(),
        }
    }

    #[test]
    fn specs_only_name_types_that_can_host_the_task() {
        let nodes = [node("T4", 2, 32_000), node("V100", 8, 96_000)];
        let tasks: Vec<OpenbTask> = (0..400)
            .map(|i| task(i, [0, 1, 1, 4][i % 4], 1000))
            .collect();
        let spec = VariantSpec {
            gpu_spec: 1.0,
            spec_pair: 0.0,
            multi_gpu: 0.0,
            seed: 3,
        };
        let out = derive(&nodes, &tasks, &spec);
        assert_eq!(out.len(), tasks.len());
        for t in &out {
            match t.num_gpu {
                0 => assert!(t.gpu_spec.is_empty()),
                4 => assert_eq!(t.gpu_spec, "V100", "only the 8-GPU node hosts 4 GPUs"),
                _ => assert!(t.gpu_spec == "T4" || t.gpu_spec == "V100"),
            }
        }
        // proportional to GPUs: V100 has 8 of 10 GPUs
        let v = out
            .iter()
            .filter(|t| t.num_gpu == 1 && t.gpu_spec == "V100")
            .count();
        assert!(
            (140..=185).contains(&v),
            "{v} of 200 single-GPU tasks on V100"
        );
        assert_eq!(derive(&nodes, &tasks, &spec), out, "reproducible");
    }

    #[test]
    fn multi_gpu_share_and_round_trip() {
        let nodes = [node("T4", 8, 96_000)];
        let tasks: Vec<OpenbTask> = (0..1000).map(|i| task(i, 1, 500)).collect();
        let spec = VariantSpec {
            gpu_spec: 0.0,
            spec_pair: 0.0,
            multi_gpu: 0.3,
            seed: 9,
        };
        let out = derive(&nodes, &tasks, &spec);
        let gangs = out.iter().filter(|t| t.num_gpu > 1).count();
        assert!((250..=350).contains(&gangs), "{gangs}");
        assert!(out
            .iter()
            .filter(|t| t.num_gpu > 1)
            .all(|t| t.gpu_milli == MILLI && [2, 4, 8].contains(&t.num_gpu)));
        let dir = std::env::temp_dir().join(format!("talon-variant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pods.csv");
        std::fs::write(&p, to_csv(&out)).unwrap();
        assert_eq!(super::super::openb::load_tasks(&p).unwrap(), out);
        std::fs::remove_dir_all(&dir).ok();
        assert!(VariantSpec {
            multi_gpu: 1.5,
            ..spec
        }
        .validate()
        .unwrap_err()
        .contains("--multi-gpu"));
    }
}
