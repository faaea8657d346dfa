//! Replicas as external engine processes: the [`ExecutorFactory`] that
//! starts one per assigned replica with the engine profile its model names,
//! on its GPUs or MIG instance, its artifact located (or downloaded), its
//! port leased, its memory share and service-time model worked out.

use std::collections::HashMap;
use std::sync::Arc;

use talon_proto::v1 as pb;

use crate::catalog;
use crate::executor::{ExecError, Executor};
use crate::perf::Correction;
use crate::replicas::{ExecutorFactory, Placement};

/// Replicas run as external engine processes, each with the engine profile
/// its model names, pinned to their GPUs or MIG device with
/// `CUDA_VISIBLE_DEVICES`.
pub struct EngineFactory {
    /// Engine name → its profile; under [`ANY_ENGINE`], the one that runs
    /// models of every other engine (`engine_command`).
    pub profiles: std::collections::BTreeMap<String, crate::executor::profiles::EngineProfile>,
    /// GPU index → uuid, from the inventory.
    pub gpu_uuids: HashMap<u32, String>,
    pub log_dir: std::path::PathBuf,
    /// Lays out MIG instances on the GPUs the agent manages
    /// (`--manage-mig`); none: replicas use the instances there are.
    pub mig: Option<Arc<dyn crate::probe::mig::MigDriver>>,
    /// GPU index → catalog type, from the inventory: what the replicas'
    /// service-time models are for.
    pub gpu_types: HashMap<u32, String>,
    /// The Hugging Face cache `hf://` artifacts are looked up in.
    pub hf_cache: Option<std::path::PathBuf>,
    /// Where `http(s)://` artifacts are downloaded to.
    pub artifact_cache: Option<std::path::PathBuf>,
    /// The engines' ports.
    pub ports: Arc<crate::executor::ports::Ports>,
    /// Give replicas a learned service-time model (`--engine-signals`).
    pub service_models: bool,
    /// GPU index → its memory, and MIG device UUID → its memory, MiB:
    /// what `{memory_fraction}` is a share of.
    pub device_memory_mib: HashMap<String, u64>,
    pub correction: Arc<Correction>,
}

/// The profile name that stands for every engine (an agent's single
/// `engine_command`, or the simulated executor), as advertised.
pub const ANY_ENGINE: &str = "*";

impl EngineFactory {
    /// The profile that runs models of `engine`.
    fn profile(
        &self,
        engine: &str,
    ) -> Result<&crate::executor::profiles::EngineProfile, ExecError> {
        self.profiles
            .get(engine)
            .or_else(|| self.profiles.get(ANY_ENGINE))
            .ok_or_else(|| {
                ExecError::Config(format!(
                    "this agent has no engine profile {engine:?} (it runs: {}); add [engines.{engine}] to its configuration",
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })
    }
}

impl ExecutorFactory for EngineFactory {
    fn start(&self, r: &pb::AssignedReplica) -> Result<Arc<dyn Executor>, ExecError> {
        use crate::executor::external::{ExternalEngine, Placeholders};
        let profile = self.profile(&r.engine)?;
        let mut placement = Placement::of(r)?;
        if let Some((profile, start)) = &placement.mig_slice {
            let Some(driver) = &self.mig else {
                return Err(ExecError::Config(format!(
                    "the replica is assigned MIG instance {profile}@{start}, but this agent does not manage MIG (run it with --manage-mig)"
                )));
            };
            let uuid = crate::probe::mig::ensure_instance(
                driver.as_ref(),
                placement.gpus[0],
                profile,
                *start,
            )
            .map_err(|e| ExecError::Config(e.to_string()))?;
            placement.mig_device = Some(uuid);
        }
        if placement.pipeline.is_some() {
            return Err(ExecError::Config(
                "engine processes do not run pipeline stages across nodes in this release (the simulated executor does); give the model a node whose GPUs hold it".into(),
            ));
        }
        // the engine sees its MIG device, or its GPUs, and nothing else
        let gpus = match &placement.mig_device {
            Some(uuid) => uuid.clone(),
            None => placement
                .gpus
                .iter()
                .map(|g| {
                    self.gpu_uuids
                        .get(g)
                        .cloned()
                        .ok_or_else(|| ExecError::Config(format!("this node has no GPU {g}")))
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
        };
        let lease = self.ports.lease().map_err(ExecError::Config)?;
        let port = lease.port();
        let artifact = crate::artifacts::locate(
            &r.artifact_uri,
            self.hf_cache.as_deref(),
            self.artifact_cache.as_deref(),
        )
        .map_err(ExecError::Config)?;
        let device = placement
            .mig_device
            .clone()
            .unwrap_or_else(|| placement.gpus[0].to_string());
        // an instance made for this replica: its profile says its memory
        let made = placement.mig_slice.as_ref().and_then(|(profile, _)| {
            let gb = profile
                .split('.')
                .nth(1)?
                .trim_end_matches("gb")
                .parse::<u64>()
                .ok()?;
            Some(gb * 1024)
        });
        let memory_fraction = match made.or_else(|| self.device_memory_mib.get(&device).copied()) {
            Some(total) if total > 0 => (r.memory_mib as f64 / total as f64).clamp(0.01, 1.0),
            _ => 0.9,
        };
        let placeholders = Placeholders {
            model: r.model.clone(),
            artifact: artifact.path().display().to_string(),
            port,
            gpus,
            tp: placement.gpus.len() as u32 / placement.stages,
            pp: placement.stages,
            memory_fraction,
        };
        let tp = placement.gpus.len() as u32 / placement.stages;
        let options = r
            .engine_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let argv = profile
            .argv(&placeholders, &options)
            .map_err(ExecError::Config)?;
        let fetch = match artifact {
            crate::artifacts::Artifact::Fetch { url, path } => Some((url, path)),
            crate::artifacts::Artifact::Local(_) => None,
        };
        let launch = crate::executor::external::Launch {
            argv,
            env: profile.env.clone(),
            fetch,
            lease: Some(lease),
        };
        let mut engine = ExternalEngine::launch(
            launch,
            placeholders,
            profile.settings.clone(),
            &self.log_dir,
        )?;
        // a service-time model for GPUs of a type in the catalog
        let gpu_type = self
            .gpu_types
            .get(&placement.gpus[0])
            .and_then(|t| catalog::by_key(t))
            .filter(|_| self.service_models);
        if let Some(gpu_type) = gpu_type {
            engine = engine.with_service_model(crate::executor::signals::ServiceModel {
                model: r.model.clone(),
                shape: crate::perf::ModelShape::from_memory_mib(
                    r.memory_mib * placement.gpus.len() as u64,
                ),
                gpu_type,
                tp,
                correction: self.correction.clone(),
            });
        }
        Ok(Arc::new(engine))
    }
}
