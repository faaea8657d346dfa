//! What planning reads, and whether a write changed it.
//!
//! The leader plans on a copy of the models, nodes and replicas
//! ([`super::planning_view`]) and makes no plan again from inputs that gave
//! an empty one. Most writes do not touch those inputs at all — usage
//! records, audit entries, credentials, tenants, gateway rules — and a
//! model's labels matter to planning only for the few [`PLANNED_LABELS`].
//! [`Inputs`] tells the two apart: its generation moves only when something
//! planning reads changed, so ten label writes a second on a fleet of
//! 20,000 replicas are not ten plans of the whole fleet.

use std::sync::Arc;

use crate::raft_types::LogId;
use crate::state::model::CANARY_LABEL;
use crate::state::{Model, State};

use super::OBSERVED_MEMORY_LABEL;

/// The model labels planning reads; every other label is for people,
/// the gateway or the autoscaler, and changing one does not call for a
/// plan. Planning reads labels only through [`label`], which holds it to
/// this list.
pub const PLANNED_LABELS: [&str; 5] = [
    "node-selector",
    "layers",
    "gpu-types",
    OBSERVED_MEMORY_LABEL,
    CANARY_LABEL,
];

/// A label planning reads (one of [`PLANNED_LABELS`]).
pub(super) fn label<'m>(model: &'m Model, key: &str) -> Option<&'m String> {
    debug_assert!(
        PLANNED_LABELS.contains(&key),
        "planning read the label {key:?}, which PLANNED_LABELS does not list: add it there, or a change of it will not be planned"
    );
    model.labels.get(key)
}

/// Whether two records of a model plan alike: every field but the
/// revision, the times and the labels planning does not read. (The
/// revision goes into the commands a plan makes, so the view is refreshed
/// even when this holds; it just needs no new plan.)
fn plans_alike(a: &Model, b: &Model) -> bool {
    a.name == b.name
        && a.versions == b.versions
        && a.latency_slo_ms == b.latency_slo_ms
        && a.min_replicas == b.min_replicas
        && a.max_replicas == b.max_replicas
        && a.priority == b.priority
        && PLANNED_LABELS
            .iter()
            .all(|k| a.labels.get(*k) == b.labels.get(*k))
}

/// Whether planning on `state` reads the same as planning on `view`.
/// Nodes are compared by pointer first: the state's records are shared
/// with the view, and an apply that changes one replaces it.
fn same_for_planning(view: &State, state: &State) -> bool {
    view.models.len() == state.models.len()
        && view
            .models
            .iter()
            .zip(&state.models)
            .all(|((ka, a), (kb, b))| ka == kb && plans_alike(a, b))
        && view.nodes.len() == state.nodes.len()
        && view
            .nodes
            .iter()
            .zip(&state.nodes)
            .all(|((ka, a), (kb, b))| ka == kb && (Arc::ptr_eq(a, b) || a == b))
        && view.replicas == state.replicas
}

/// The leader's copy of what planning reads, kept up to date with the
/// applied state, and a generation that moves only when that copy reads
/// differently.
#[derive(Default)]
pub struct Inputs {
    view: Option<(Option<LogId>, Arc<State>)>,
    generation: u64,
}

impl Inputs {
    /// The view as of `applied` (the entry `state` is at), and its
    /// generation. Copies only after an apply, and copies the fleet only
    /// when planning reads something new; otherwise only the models are
    /// taken again (for their revisions).
    pub fn refresh(&mut self, applied: Option<LogId>, state: &State) -> (u64, Arc<State>) {
        match &mut self.view {
            Some((at, view)) if *at == applied => {}
            Some((at, view)) if same_for_planning(view, state) => {
                Arc::make_mut(view).models = state.models.clone();
                *at = applied;
            }
            _ => {
                self.view = Some((applied, Arc::new(super::planning_view(state))));
                self.generation += 1;
            }
        }
        let (_, view) = self.view.as_ref().expect("set above");
        (self.generation, view.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::reconcile::tests::{converge, inventory, model, run};
    use crate::state::node::Scheduling;
    use crate::state::Command;

    fn labels(name: &str, key: &str, value: &str) -> Command {
        Command::UpdateModelLabels {
            name: name.into(),
            set: BTreeMap::from([(key.to_string(), value.to_string())]),
            remove: Vec::new(),
        }
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
    }

    #[test]
    fn only_writes_planning_reads_move_the_generation() {
        let (mut s, mut i) = (State::default(), 0);
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("a", &[("l4", 24)])),
        );
        run(&mut s, &mut i, model("m", 10_000, 1));
        converge(&mut s, &mut i);
        let mut inputs = Inputs::default();
        let (first, _) = inputs.refresh(Some(log_id(i)), &s);

        // nothing applied since: the same view
        assert_eq!(inputs.refresh(Some(log_id(i)), &s).0, first);

        // a label for people, then an audit entry: no new plan, but the
        // view has the model's new revision (a plan made later carries it)
        run(&mut s, &mut i, labels("m", "team", "search"));
        run(
            &mut s,
            &mut i,
            Command::Audit {
                action: "note".into(),
                target: "m".into(),
                detail: "x".into(),
            },
        );
        let (g, view) = inputs.refresh(Some(log_id(i)), &s);
        assert_eq!(g, first, "a label planning does not read");
        assert_eq!(view.models["m"].revision, s.models["m"].revision);
        assert_eq!(
            view.models["m"].labels.get("team").map(String::as_str),
            Some("search")
        );
        drop(view);

        // every input planning reads moves it
        let mut last = first;
        let mut moved = |s: &State, i: u64, what: &str| {
            let (g, _) = inputs.refresh(Some(log_id(i)), s);
            assert!(g > last, "{what} is read by planning");
            last = g;
        };
        let values = ["zone=a", "40", "l4", "v1:12000", "50"];
        for (key, value) in PLANNED_LABELS.into_iter().zip(values) {
            run(&mut s, &mut i, labels("m", key, value));
            moved(&s, i, key);
        }
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("b", &[("l4", 24)])),
        );
        moved(&s, i, "a new node");
        run(
            &mut s,
            &mut i,
            Command::SetNodeScheduling {
                node_id: "a".into(),
                action: Scheduling::Cordon,
            },
        );
        moved(&s, i, "a cordon");
        run(&mut s, &mut i, model("n", 10_000, 1));
        moved(&s, i, "a new model");
        converge(&mut s, &mut i);
        moved(&s, i, "a placement");
    }
}
