//! Loader for Alibaba's openb traces (FGD, ATC'23): the GPU node list and the
//! task lists. Columns are found by name (the multi-GPU task lists have no
//! `gpu_spec` column).

use std::path::Path;

use super::csv::{LoadError, Table};
use crate::frag::TaskShape;
use crate::types::{Gpu, GpuRequest, Node, Workload, MILLI};

/// One row of `openb_pod_list_*.csv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenbTask {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub num_gpu: u32,
    pub gpu_milli: u32,
    pub gpu_spec: String,
}

impl OpenbTask {
    /// GPU request in milli as BENCHMARKS.md defines it: `num_gpu × 1000`, or
    /// `gpu_milli` when `num_gpu == 1`.
    pub fn gpu_request_milli(&self) -> u64 {
        match self.num_gpu {
            0 => 0,
            1 => self.gpu_milli as u64,
            n => n as u64 * MILLI as u64,
        }
    }

    /// FGD's view of the task shape (memory is not part of it).
    pub fn shape(&self) -> TaskShape {
        let (milli, count) = match self.num_gpu {
            0 => (0, 0),
            1 => (self.gpu_milli, 1),
            n => (MILLI, n),
        };
        TaskShape {
            cpu_milli: self.cpu_milli,
            milli,
            count,
            gpu_spec: self.gpu_spec.clone(),
        }
    }

    pub fn to_workload(&self) -> Workload {
        let gpu = match self.num_gpu {
            0 => GpuRequest::None,
            1 if self.gpu_milli < MILLI => GpuRequest::Fraction {
                milli: self.gpu_milli,
            },
            n => GpuRequest::Whole { count: n },
        };
        Workload {
            name: self.name.clone(),
            cpu_milli: self.cpu_milli,
            memory_mib: self.memory_mib,
            gpu,
            gpu_types: self
                .gpu_spec
                .split('|')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            anti_affinity: None,
        }
    }
}

/// Read `openb_node_list_*.csv` (`sn,cpu_milli,memory_mib,gpu,model`).
pub fn load_nodes(path: &Path) -> Result<Vec<Node>, LoadError> {
    let t = Table::read(path, true)?;
    let (c_sn, c_cpu, c_mem, c_gpu, c_model) = (
        t.need_col("sn")?,
        t.need_col("cpu_milli")?,
        t.need_col("memory_mib")?,
        t.need_col("gpu")?,
        t.need_col("model")?,
    );
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, f) in &t.rows {
        let name = f
            .get(c_sn)
            .ok_or_else(|| t.err(*line, "missing sn"))?
            .clone();
        let cpu: u64 = t.parse(*line, f, c_cpu, "cpu_milli")?;
        let mem: u64 = t.parse(*line, f, c_mem, "memory_mib")?;
        let gpus: u32 = t.parse(*line, f, c_gpu, "gpu")?;
        let model = f.get(c_model).cloned().unwrap_or_default();
        if gpus > 0 && (model.is_empty() || model == "nan") {
            return Err(t.err(*line, format!("node {name} has {gpus} GPUs but no model")));
        }
        if gpus > 64 {
            return Err(t.err(*line, format!("node {name}: {gpus} GPUs is more than 64")));
        }
        out.push(Node {
            name,
            cpu_milli: cpu,
            memory_mib: mem,
            gpus: (0..gpus).map(|_| Gpu::new(&model)).collect(),
            cost_per_hour: 0.0,
        });
    }
    Ok(out)
}

/// Read `openb_pod_list_*.csv`.
pub fn load_tasks(path: &Path) -> Result<Vec<OpenbTask>, LoadError> {
    let t = Table::read(path, true)?;
    let (c_name, c_cpu, c_mem, c_num, c_milli) = (
        t.need_col("name")?,
        t.need_col("cpu_milli")?,
        t.need_col("memory_mib")?,
        t.need_col("num_gpu")?,
        t.need_col("gpu_milli")?,
    );
    let c_spec = t.col("gpu_spec");
    let mut out = Vec::with_capacity(t.rows.len());
    for (line, f) in &t.rows {
        let name = f
            .get(c_name)
            .ok_or_else(|| t.err(*line, "missing name"))?
            .clone();
        let num_gpu: u32 = t.parse(*line, f, c_num, "num_gpu")?;
        let gpu_milli: u32 = t.parse(*line, f, c_milli, "gpu_milli")?;
        if num_gpu == 1 && (gpu_milli == 0 || gpu_milli > MILLI) {
            return Err(t.err(
                *line,
                format!("task {name}: num_gpu 1 with gpu_milli {gpu_milli} (want 1..=1000)"),
            ));
        }
        let spec = c_spec
            .and_then(|c| f.get(c).cloned())
            .filter(|s| s != "nan")
            .unwrap_or_default();
        out.push(OpenbTask {
            name,
            cpu_milli: t.parse(*line, f, c_cpu, "cpu_milli")?,
            memory_mib: t.parse(*line, f, c_mem, "memory_mib")?,
            num_gpu,
            gpu_milli,
            gpu_spec: spec,
        });
    }
    Ok(out)
}

/// The node list repeated `scale` times with new names (B1's 10× cluster).
pub fn scale_nodes(nodes: &[Node], scale: usize) -> Vec<Node> {
    if scale <= 1 {
        return nodes.to_vec();
    }
    let mut out = Vec::with_capacity(nodes.len() * scale);
    for k in 0..scale {
        for n in nodes {
            let mut m = n.clone();
            m.name = format!("{}-x{k}", n.name);
            out.push(m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_line() {
        let dir = std::env::temp_dir().join(format!("talon-openb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pods.csv");
        std::fs::write(
            &p,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1000,10,1,500\nb,x,10,0,0\n",
        )
        .unwrap();
        let e = load_tasks(&p).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("cpu_milli"), "{e}");
        std::fs::write(
            &p,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1000,10,1,500\nb,2000,10,4,1000\n",
        )
        .unwrap();
        let t = load_tasks(&p).unwrap();
        assert_eq!(t[0].gpu_request_milli(), 500);
        assert_eq!(t[1].gpu_request_milli(), 4000);
        assert_eq!(t[1].to_workload().gpu, GpuRequest::Whole { count: 4 });
        std::fs::remove_dir_all(&dir).ok();
    }
}
