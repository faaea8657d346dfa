use std::collections::BTreeMap;
use talon_scheduler::engine::{decide, DecideOptions};
use talon_scheduler::policy::PolicyKind;
use talon_scheduler::rng::mix2;
use talon_scheduler::sim::b1::{prepare, workload_order};
fn main() {
    let pol = std::env::args().nth(1).unwrap_or("fgd".into());
    let p = prepare(std::path::Path::new("/work/shared/data"), "default", 1).unwrap();
    let order = workload_order(&p.tasks, p.capacity, 1.3, 42);
    let kind = PolicyKind::parse(&pol).unwrap();
    let mut pol = kind.build(&p.typical, &p.talon_typical);
    let mut st = p.state0.clone();
    let mut failed: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let mut arrived = 0u64;
    for (k, &ti) in order.iter().enumerate() {
        let d = &p.demands[ti];
        arrived += d.total_milli();
        let dec = decide(
            &st,
            d,
            pol.as_mut(),
            DecideOptions {
                seed: mix2(42, 0x6e6f_6465),
                nonce: mix2(42, k as u64),
                explain: false,
            },
        );
        match dec.assignment {
            Some(a) => st.apply(&a, d).unwrap(),
            None => {
                if arrived as f64 <= p.capacity as f64 * 1.0 {
                    let key = format!("{:?} cpu{}", d.kind, d.cpu_milli / 1000);
                    let e = failed.entry(key).or_default();
                    e.0 += 1;
                    e.1 += d.total_milli();
                }
            }
        }
        if (arrived as f64) > p.capacity as f64 * 1.0 {
            break;
        }
    }
    let mut tot: BTreeMap<String, [u64; 6]> = BTreeMap::new();
    for (i, n) in st.nodes.iter().enumerate() {
        let t = st.gpu_types[n.gpu_type[0] as usize].clone() + &format!("x{}", n.gpu_cap.len());
        let e = tot.entry(t).or_default();
        for &g in &n.gpu_free {
            if g == 1000 {
                e[0] += 1000
            } else {
                e[1] += g as u64
            }
        }
        if n.cpu_free < 4000 {
            e[2] += n.gpu_free_total();
        }
        e[3] += 1;
        if n.workloads == 0 {
            e[4] += 1;
        }
        let _ = i;
    }
    println!("type: fullfree partial cpu-starved nodes idle");
    for (k, v) in tot {
        println!("{k}: {:?}", v);
    }
    let mut fsum = 0;
    for (k, v) in &failed {
        println!("failed {k}: {v:?}");
        fsum += v.1;
    }
    println!("failed milli {fsum} alloc {}", st.gpu_allocated_milli());
}
