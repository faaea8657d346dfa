use talon_scheduler::sim::b1::prepare;
fn main() {
    let p = prepare(std::path::Path::new("/work/shared/data"), "default", 1).unwrap();
    let mut s = 0.0;
    for t in &p.typical.tasks {
        s += t.freq;
        println!("{:?}", t);
    }
    println!("sum {s} n {}", p.typical.tasks.len());
    println!(
        "G2 empty {}",
        p.typical.node_frag(96000, &[1000; 8], u64::MAX)
    );
    println!(
        "G2 one 500 {}",
        p.typical.node_frag(
            96000 - 6000,
            &[500, 1000, 1000, 1000, 1000, 1000, 1000, 1000],
            u64::MAX
        )
    );
}
