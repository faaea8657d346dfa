//! The model registry's commands of [`State::apply`]: create a model or a
//! version, delete one, change labels (the types and their checks are in
//! [`super::model`]).

use super::*;

impl State {
    pub(super) fn create_model(
        &mut self,
        index: u64,
        at: u64,
        spec: &ModelSpec,
    ) -> Result<Model, (Response, Vec<Change>)> {
        spec.validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        let version = ModelVersion {
            version: spec.version.clone(),
            engine: spec.engine.clone(),
            artifact_uri: spec.artifact_uri.clone(),
            memory_mib: spec.memory_mib,
            created_at_ms: at,
        };
        let model = match self.models.get_mut(&spec.name) {
            Some(model) => {
                if model.versions.iter().any(|v| v.version == spec.version) {
                    return Err(rejected(
                        RejectionKind::AlreadyExists,
                        format!(
                            "model {:?} already has version {:?}; register a new version or delete this one first",
                            spec.name, spec.version
                        ),
                    ));
                }
                model.versions.push(version);
                model.latency_slo_ms = spec.latency_slo_ms;
                model.min_replicas = spec.min_replicas;
                model.max_replicas = spec.max_replicas;
                model.priority = spec.priority.clone();
                model.labels = spec.labels.clone();
                // Entry times come from whichever coordinator proposed them; a
                // leader whose clock is behind the last one must not move a
                // record back in time (fuzz finding: updated before created).
                model.updated_at_ms = at.max(model.updated_at_ms);
                model.revision = index;
                model.clone()
            }
            None => {
                let model = Model {
                    name: spec.name.clone(),
                    versions: vec![version],
                    latency_slo_ms: spec.latency_slo_ms,
                    min_replicas: spec.min_replicas,
                    max_replicas: spec.max_replicas,
                    priority: spec.priority.clone(),
                    labels: spec.labels.clone(),
                    created_at_ms: at,
                    updated_at_ms: at,
                    revision: index,
                };
                self.models.insert(spec.name.clone(), model.clone());
                model
            }
        };
        Ok(model)
    }

    pub(super) fn delete_model(
        &mut self,
        index: u64,
        at: u64,
        name: &str,
        version: Option<&str>,
    ) -> Result<(), (Response, Vec<Change>)> {
        let Some(model) = self.models.get_mut(name) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("model {name:?} does not exist"),
            ));
        };
        match version {
            None => {
                self.models.remove(name);
            }
            Some(version) => {
                let Some(pos) = model.versions.iter().position(|v| v.version == version) else {
                    let known: Vec<&str> =
                        model.versions.iter().map(|v| v.version.as_str()).collect();
                    return Err(rejected(
                        RejectionKind::NotFound,
                        format!(
                            "model {name:?} has no version {version:?}; it has: {}",
                            known.join(", ")
                        ),
                    ));
                };
                if model.versions.len() == 1 {
                    return Err(rejected(
                        RejectionKind::Invalid,
                        format!(
                            "version {version:?} is the last version of model {name:?}; delete the whole model instead"
                        ),
                    ));
                }
                model.versions.remove(pos);
                // Never back in time (see create_model).
                model.updated_at_ms = at.max(model.updated_at_ms);
                model.revision = index;
            }
        }
        Ok(())
    }

    pub(super) fn update_labels(
        &mut self,
        index: u64,
        at: u64,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        expect: &BTreeMap<String, String>,
    ) -> Result<Model, (Response, Vec<Change>)> {
        let Some(model) = self.models.get(name) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("model {name:?} does not exist"),
            ));
        };
        for (key, wanted) in expect {
            let found = model.labels.get(key);
            if found != Some(wanted) {
                let found = match found {
                    Some(v) => format!("{v:?}"),
                    None => "no such label".to_string(),
                };
                return Err(rejected(
                    RejectionKind::Conflict,
                    format!(
                        "model {name:?} label {key:?} is {found}, not the expected {wanted:?} (revision {}); nothing was changed: read the model again and retry",
                        model.revision
                    ),
                ));
            }
        }
        if set.is_empty() && remove.is_empty() {
            return Err(rejected(
                RejectionKind::Invalid,
                "no label to set or remove; give at least one".into(),
            ));
        }
        if let Some(key) = remove.iter().find(|k| set.contains_key(*k)) {
            return Err(rejected(
                RejectionKind::Invalid,
                format!("label {key:?} is both set and removed; give it in one list only"),
            ));
        }
        let mut labels = model.labels.clone();
        for key in remove {
            labels.remove(key);
        }
        labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        model::validate_labels(&labels).map_err(|m| rejected(RejectionKind::Invalid, m))?;
        let model = self.models.get_mut(name).expect("checked above");
        model.labels = labels;
        // Never back in time (see create_model).
        model.updated_at_ms = at.max(model.updated_at_ms);
        model.revision = index;
        Ok(model.clone())
    }
}
