//! The engine's choice of a MIG start slice, measured: an online stream of
//! MIG instance requests and departures on a few GPUs, each request put on
//! the GPU with the most compute in use that can hold it (the engine's
//! rule), at the first legal start or at the start that keeps the most
//! placements possible ([`MigOccupancy::best_fit`]). No look-ahead and no
//! re-layout: what the online choice alone is worth. A refusal counts as
//! *fragmentation* when the GPUs together had the compute and memory slices
//! free.

use std::path::Path;

use crate::mig::{MigModel, MigOccupancy};
use crate::rng::Rng;

/// Start-slice strategies compared.
const STRATEGIES: [&str; 2] = ["first_fit", "best_fit"];

struct Outcome {
    placed: u32,
    refused: u32,
    fragmentation: u32,
}

fn run(model: MigModel, gpus: usize, events: usize, seed: u64, best: bool) -> Outcome {
    let mut rng = Rng::new(seed);
    let table = model.profiles();
    // every profile but the whole-GPU one, uniformly
    let choices: Vec<u8> = (0..table.len() as u8)
        .filter(|&p| table[p as usize].compute < model.compute_slices())
        .collect();
    let mut occ = vec![MigOccupancy::default(); gpus];
    let mut live: Vec<(usize, u8, u8)> = Vec::new();
    let mut out = Outcome {
        placed: 0,
        refused: 0,
        fragmentation: 0,
    };
    for _ in 0..events {
        if !live.is_empty() && rng.below(10) < 4 {
            let k = rng.below(live.len() as u64) as usize;
            let (g, p, s) = live.swap_remove(k);
            occ[g].remove(model, p, s);
            continue;
        }
        let p = choices[rng.below(choices.len() as u64) as usize];
        let pick = (0..gpus)
            .filter_map(|g| {
                let start = if best {
                    occ[g].best_fit(model, p)
                } else {
                    occ[g].first_fit(model, p)
                }?;
                Some((occ[g].compute, g, start))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        match pick {
            Some((_, g, s)) => {
                occ[g].place(model, p, s);
                live.push((g, p, s));
                out.placed += 1;
            }
            None => {
                out.refused += 1;
                let prof = &table[p as usize];
                let room = occ.iter().any(|o| {
                    o.compute + prof.compute <= model.compute_slices()
                        && (model.memory_slices() as u32 - o.mem_mask.count_ones())
                            >= prof.mem_slices as u32
                });
                if room {
                    out.fragmentation += 1;
                }
            }
        }
    }
    out
}

fn median(mut v: Vec<u32>) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        f64::from(v[n / 2])
    } else {
        (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
    }
}

/// Runs the comparison for A100-80GB, H100-94GB and A30 on `gpus` GPUs over
/// `seeds` seeds from `seed_base`, prints a table and writes
/// `mig_starts.json` under `out` when given.
pub fn run_cli(
    seeds: u64,
    seed_base: u64,
    gpus: usize,
    events: usize,
    out: Option<&Path>,
) -> Result<(), String> {
    if seeds == 0 || gpus == 0 || events == 0 {
        return Err("seeds, gpus and events must be at least 1".into());
    }
    println!(
        "{:<12} {:<10} {:>14} {:>14} {:>20}",
        "gpu", "start", "placed (med)", "refused (med)", "fragmentation (med)"
    );
    let mut rows = Vec::new();
    for model in [MigModel::A100_80GB, MigModel::H100_94GB, MigModel::A30] {
        for (k, name) in STRATEGIES.iter().enumerate() {
            let runs: Vec<Outcome> = (seed_base..seed_base + seeds)
                .map(|s| run(model, gpus, events, s, k == 1))
                .collect();
            let placed = median(runs.iter().map(|o| o.placed).collect());
            let refused = median(runs.iter().map(|o| o.refused).collect());
            let frag = median(runs.iter().map(|o| o.fragmentation).collect());
            println!(
                "{:<12} {:<10} {placed:>14.1} {refused:>14.1} {frag:>20.1}",
                format!("{model:?}"),
                name
            );
            rows.push(
                serde_json::json!({"gpu": format!("{model:?}"), "start": name,
                "placed_median": placed, "refused_median": refused, "fragmentation_median": frag,
                "seeds": seeds, "seed_base": seed_base, "gpus": gpus, "events": events}),
            );
        }
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("mig_starts.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&rows).expect("json"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
