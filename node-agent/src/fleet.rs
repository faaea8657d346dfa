//! The spec of a simulated host: which GPUs (from the catalog), in which MIG
//! layouts, and the host's CPU, memory, cost and labels.
//!
//! Given as a TOML file or, for the GPUs alone, a compact flag:
//! `h100-sxm:2:mig=3g.40gb+3g.40gb,a100-80gb:1,l4:4`. Every error names the
//! group and says what to change; a MIG layout is accepted only if it has a
//! legal placement on the GPU (NVIDIA's MIG user guide tables).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use talon_scheduler::mig::{pack_gpu, MigInstance};

use crate::catalog::{self, GpuType};

/// Most GPUs one simulated host may have.
pub const MAX_GPUS: u32 = 64;

/// One group of identical GPUs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuGroup {
    #[serde(rename = "type")]
    pub gpu_type: String,
    #[serde(default = "one")]
    pub count: u32,
    /// MIG profiles every GPU of the group is partitioned into.
    #[serde(default)]
    pub mig: Vec<String>,
}

fn one() -> u32 {
    1
}

/// Host attributes besides the GPUs.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSpec {
    pub cpu_cores: u32,
    pub host_memory_gib: u64,
    pub cost_per_hour: f64,
    pub labels: BTreeMap<String, String>,
}

impl Default for HostSpec {
    fn default() -> Self {
        HostSpec {
            cpu_cores: 32,
            host_memory_gib: 256,
            cost_per_hour: 0.0,
            labels: BTreeMap::new(),
        }
    }
}

/// A simulated host.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    #[serde(default)]
    pub host: HostSpec,
    pub gpus: Vec<GpuGroup>,
}

/// A validated group: its catalog type and MIG layout with placements.
#[derive(Clone, Debug)]
pub struct ResolvedGroup {
    pub gpu_type: &'static GpuType,
    pub count: u32,
    /// (profile name, placement) per instance; empty without MIG.
    pub mig: Vec<(String, MigInstance)>,
}

/// A spec that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read fleet spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("fleet spec {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("invalid fleet spec: {0}")]
    Invalid(String),
}

impl FleetSpec {
    pub fn from_file(path: &Path) -> Result<FleetSpec, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| SpecError::Parse {
            path: shown,
            message: e.to_string(),
        })
    }

    /// Parses `TYPE[:COUNT[:mig=P+P+...]],...`.
    pub fn from_flag(flag: &str) -> Result<FleetSpec, SpecError> {
        let mut gpus = Vec::new();
        for (i, group) in flag.split(',').map(str::trim).enumerate() {
            let n = i + 1;
            if group.is_empty() {
                return Err(SpecError::Invalid(format!(
                    "group {n} of {flag:?} is empty; remove the extra comma"
                )));
            }
            let mut parts = group.split(':');
            let gpu_type = parts.next().unwrap_or_default().to_string();
            let mut count = 1;
            let mut mig = Vec::new();
            for part in parts {
                if let Some(profiles) = part.strip_prefix("mig=") {
                    mig = profiles.split('+').map(str::to_string).collect();
                } else {
                    count = part.parse().map_err(|_| {
                        SpecError::Invalid(format!(
                            "group {n} ({group:?}): {part:?} is neither a GPU count nor mig=PROFILE+PROFILE"
                        ))
                    })?;
                }
            }
            gpus.push(GpuGroup {
                gpu_type,
                count,
                mig,
            });
        }
        Ok(FleetSpec {
            host: HostSpec::default(),
            gpus,
        })
    }

    /// Checks the spec against the catalog and the MIG tables.
    pub fn resolve(&self) -> Result<Vec<ResolvedGroup>, SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if self.gpus.is_empty() {
            return bad("no GPU groups; give at least one, e.g. h100-sxm:2".into());
        }
        if self.host.cpu_cores == 0 || self.host.host_memory_gib == 0 {
            return bad("host.cpu_cores and host.host_memory_gib must be at least 1".into());
        }
        if !(self.host.cost_per_hour >= 0.0 && self.host.cost_per_hour.is_finite()) {
            return bad(format!(
                "host.cost_per_hour must be 0 or more, got {}",
                self.host.cost_per_hour
            ));
        }
        let total: u32 = self.gpus.iter().map(|g| g.count).sum();
        if total > MAX_GPUS {
            return bad(format!(
                "{total} GPUs in all; a simulated host may have at most {MAX_GPUS}"
            ));
        }
        let mut resolved = Vec::new();
        for (i, group) in self.gpus.iter().enumerate() {
            let n = i + 1;
            let Some(gpu_type) = catalog::by_key(&group.gpu_type) else {
                return bad(format!(
                    "group {n}: GPU type {:?} is unknown; use one of: {}",
                    group.gpu_type,
                    catalog::keys()
                ));
            };
            if group.count == 0 {
                return bad(format!(
                    "group {n} ({}): count must be at least 1",
                    group.gpu_type
                ));
            }
            let mut mig = Vec::new();
            if !group.mig.is_empty() {
                let Some(model) = gpu_type.mig else {
                    return bad(format!(
                        "group {n}: {} does not support MIG; remove its mig profiles",
                        gpu_type.key
                    ));
                };
                let known: Vec<&str> = model.profiles().iter().map(|p| p.name).collect();
                let mut indices = Vec::new();
                for name in &group.mig {
                    let Some(index) = model.profile_index(name) else {
                        return bad(format!(
                            "group {n}: MIG profile {name:?} does not exist on {}; use one of: {}",
                            gpu_type.key,
                            known.join(", ")
                        ));
                    };
                    indices.push(index);
                }
                let Some(placed) = pack_gpu(model, &indices) else {
                    return bad(format!(
                        "group {n}: MIG layout {} has no legal placement on one {} (NVIDIA's placement rules: too many compute or memory slices, or overlapping start slots); use fewer or smaller profiles",
                        group.mig.join("+"),
                        gpu_type.key
                    ));
                };
                let mut placed = placed;
                placed.sort_by_key(|p| p.start);
                mig = placed
                    .into_iter()
                    .map(|p| (model.profiles()[p.profile as usize].name.to_string(), p))
                    .collect();
            }
            resolved.push(ResolvedGroup {
                gpu_type,
                count: group.count,
                mig,
            });
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_with_mig_resolves_to_legal_placements() {
        let spec = FleetSpec::from_flag("h100-sxm:2:mig=4g.40gb+2g.20gb+1g.10gb,l4:4").unwrap();
        let groups = spec.resolve().unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].count, 2);
        assert_eq!(groups[0].mig.len(), 3);
        let model = groups[0].gpu_type.mig.unwrap();
        let layout: Vec<MigInstance> = groups[0].mig.iter().map(|(_, p)| *p).collect();
        talon_scheduler::mig::validate_layout(model, &layout).unwrap();
        assert!(groups[1].mig.is_empty());
    }

    #[test]
    fn bad_specs_name_what_to_change() {
        let cases = [
            ("h100:2", "GPU type \"h100\" is unknown"),
            ("l4:0", "count must be at least 1"),
            ("l4:two", "neither a GPU count"),
            ("l4:1:mig=1g.10gb", "does not support MIG"),
            ("a100-80gb:1:mig=3g.20gb", "does not exist on a100-80gb"),
            ("a100-80gb:1:mig=4g.40gb+4g.40gb", "no legal placement"),
            ("l4:40,h100-sxm:30", "at most 64"),
            ("l4:1,,t4", "group 2"),
        ];
        for (flag, needle) in cases {
            let err = FleetSpec::from_flag(flag)
                .and_then(|s| s.resolve().map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle),
                "{flag}: {err} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn toml_spec_with_unknown_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, "[[gpus]]\ntype = \"l4\"\ncuont = 2\n").unwrap();
        let err = FleetSpec::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `cuont`"), "{err}");
        std::fs::write(&path, "[host]\ncpu_cores = 8\n[[gpus]]\ntype = \"a30\"\ncount = 2\nmig = [\"2g.12gb\", \"2g.12gb\"]\n")
            .unwrap();
        let groups = FleetSpec::from_file(&path).unwrap().resolve().unwrap();
        assert_eq!(groups[0].mig.len(), 2);
    }
}
