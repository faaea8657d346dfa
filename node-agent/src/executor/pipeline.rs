//! Pipelines across nodes: a replica whose stages run on several agents.
//!
//! Requests reach the first stage (the head) through its batcher. For each
//! step of a batch — the prefill, then one decode step per output token —
//! a stage runs its layers and hands the step's activations to the next
//! stage's agent over HTTP (`POST /v1/stages/<replica>/forward`, with the
//! bearer token the coordinator minted for that stage); the last stage
//! answers with the step's next-token ids, which travel back along the
//! chain. A stage that cannot be reached (gone, moving, not ready) fails
//! the step, and so the batch, as unavailable (503): the gateway retries
//! it on another replica, or on this one when its next stage is back.
//!
//! On the wire a step is its headers (`x-talon-step`, `x-talon-prompts`,
//! `x-talon-output`) and the activations as the body: [`HIDDEN_SKETCH`]
//! f16 values per token of the step (prefill: every prompt token; decode:
//! one per sequence), at most [`MAX_ACTIVATION_BYTES`]. The simulated
//! executor sends a sketch of the hidden state, not its full width: the
//! stages' compute time comes from the performance model, the hand-off's
//! bytes and round trips are real.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;

use super::ExecError;

/// f16 values per token in a step's activations.
pub const HIDDEN_SKETCH: usize = 1024;
/// Most activation bytes one step carries.
pub const MAX_ACTIVATION_BYTES: usize = 8 << 20;
/// Most sequences in one step.
pub const MAX_SEQUENCES: usize = 1024;
/// Longest prompt or output a step may declare, tokens.
pub const MAX_TOKENS: u64 = 1 << 20;
/// How long one hand-off (this stage's successors included) may take.
const HOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where this replica sits in a pipeline across nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    /// Replica id of the first stage.
    pub head: String,
    pub index: u32,
    pub count: u32,
    pub first_layer: u32,
    pub layers: u32,
    /// The stage after it; none for the last. Shared with the executor's
    /// hand-offs, so that a next stage that moved is followed without a
    /// restart of this one ([`Stage::retarget`]).
    pub next: Hop,
    /// The bearer token it accepts from the stage before it.
    pub token: String,
}

/// The next stage's endpoint and the token it expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    pub url: String,
    pub token: String,
}

/// Where a stage hands its steps: the next stage, changeable while the
/// stage runs (clones share it).
#[derive(Clone, Debug, Default)]
pub struct Hop(Arc<RwLock<Option<Next>>>);

impl Hop {
    pub fn new(next: Option<Next>) -> Hop {
        Hop(Arc::new(RwLock::new(next)))
    }

    /// The next stage now; none for the last.
    pub fn get(&self) -> Option<Next> {
        self.0.read().expect("hop lock poisoned").clone()
    }

    fn set(&self, next: Option<Next>) {
        *self.0.write().expect("hop lock poisoned") = next;
    }
}

impl PartialEq for Hop {
    fn eq(&self, other: &Hop) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Hop {}

impl Stage {
    /// The stage an assignment names, refused when it is inconsistent.
    pub fn of(p: &talon_proto::v1::PipelineStage) -> Result<Stage, ExecError> {
        if p.count < 2 || p.index >= p.count || p.layers == 0 || p.head.is_empty() {
            return Err(ExecError::Config(format!(
                "pipeline stage {} of {} with {} layers of {:?} is inconsistent",
                p.index, p.count, p.layers, p.head
            )));
        }
        let last = p.index + 1 == p.count;
        if last != p.next_url.is_empty() {
            return Err(ExecError::Config(format!(
                "stage {} of {} {}",
                p.index,
                p.count,
                if last {
                    "is the last but names a next stage"
                } else {
                    "names no next stage (its node is unknown to the coordinator)"
                }
            )));
        }
        Ok(Stage {
            head: p.head.clone(),
            index: p.index,
            count: p.count,
            first_layer: p.first_layer,
            layers: p.layers,
            next: Hop::new((!last).then(|| Next {
                url: p.next_url.clone(),
                token: p.next_token.clone(),
            })),
            token: p.token.clone(),
        })
    }

    /// Follows `to`, the same stage of the same pipeline whose next stage
    /// moved (another agent, or a new token): hands its next steps there,
    /// with no restart. False, changing nothing, when `to` is another
    /// stage or changes anything but where the next stage is.
    pub fn retarget(&self, to: &talon_proto::v1::PipelineStage) -> bool {
        let Ok(moved) = Stage::of(to) else {
            return false;
        };
        let same_stage = moved.head == self.head
            && moved.index == self.index
            && moved.count == self.count
            && moved.first_layer == self.first_layer
            && moved.layers == self.layers
            && moved.token == self.token;
        let (now, then) = (self.next.get(), moved.next.get());
        if !same_stage || now.is_none() || then.is_none() {
            return false;
        }
        self.next.set(then);
        true
    }
}

/// One step of a batch as it crosses a stage boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// 0: the prefill; k: the k-th decode step.
    pub step: u64,
    /// Prompt tokens of each sequence in the batch.
    pub prompts: Vec<u64>,
    /// Output tokens the batch decodes.
    pub output: u64,
}

impl Step {
    /// Tokens whose activations the step carries.
    pub fn tokens(&self) -> u64 {
        if self.step == 0 {
            self.prompts.iter().sum()
        } else {
            self.prompts.len() as u64
        }
    }

    /// Bytes of its activations.
    pub fn activation_bytes(&self) -> usize {
        (self.tokens() as usize)
            .saturating_mul(HIDDEN_SKETCH * 2)
            .min(MAX_ACTIVATION_BYTES)
    }

    /// Reads a step from a forward call's headers, refusing what is out of
    /// range and saying which.
    pub fn from_headers(headers: &HeaderMap) -> Result<Step, String> {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| format!("header {name} is missing"))
        };
        let number = |name: &str, text: &str| {
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_TOKENS)
                .ok_or_else(|| format!("{name} {text:?} must be a whole number up to {MAX_TOKENS}"))
        };
        let step = number("x-talon-step", get("x-talon-step")?)?;
        let output = number("x-talon-output", get("x-talon-output")?)?;
        let prompts = get("x-talon-prompts")?
            .split(',')
            .map(|p| number("a prompt length in x-talon-prompts", p))
            .collect::<Result<Vec<u64>, String>>()?;
        if prompts.is_empty() || prompts.len() > MAX_SEQUENCES {
            return Err(format!(
                "x-talon-prompts names {} sequences; a step has 1 to {MAX_SEQUENCES}",
                prompts.len()
            ));
        }
        if step > output {
            return Err(format!(
                "x-talon-step {step} is past the batch's {output} decode steps"
            ));
        }
        Ok(Step {
            step,
            prompts,
            output,
        })
    }

    fn prompts_header(&self) -> String {
        let p: Vec<String> = self.prompts.iter().map(u64::to_string).collect();
        p.join(",")
    }
}

/// Activations a stage passes on: its input, worked by its layers (a hash
/// chain standing in for the math), the step's size.
pub fn activations(input: &[u8], stage: &Stage, step: &Step) -> Vec<u8> {
    let mut h = fnv(input) ^ (u64::from(stage.first_layer) << 32) ^ step.step;
    let mut out = vec![0u8; step.activation_bytes()];
    for chunk in out.chunks_mut(8) {
        h ^= h << 13;
        h ^= h >> 7;
        h ^= h << 17;
        chunk.copy_from_slice(&h.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// What the last stage answers: one next-token id per sequence (u32, LE).
pub fn next_tokens(input: &[u8], step: &Step) -> Vec<u8> {
    let h = fnv(input);
    (0..step.prompts.len() as u64)
        .flat_map(|i| ((h.rotate_left(i as u32 % 64) ^ i) as u32 % 32_000).to_le_bytes())
        .collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Hands `step`'s activations to the next stage; its answer (the next-token
/// ids, from the last stage) comes back.
pub async fn hand_off(
    client: &reqwest::Client,
    next: &Next,
    step: &Step,
    activations: Vec<u8>,
) -> Result<Vec<u8>, ExecError> {
    let body = send_step(client, next, step, activations).await?;
    let expected = step.prompts.len() * 4;
    if body.len() != expected {
        return Err(ExecError::Engine(format!(
            "next pipeline stage {} answered {} bytes for {} sequences; expected {expected}",
            next.url,
            body.len(),
            step.prompts.len()
        )));
    }
    Ok(body)
}

/// Sends a step's body to the next stage with its headers; its answer's
/// bytes, or why the stage could not take it (unreachable, moving and not
/// found are [`ExecError::StageLost`]: worth retrying).
pub async fn send_step(
    client: &reqwest::Client,
    next: &Next,
    step: &Step,
    activations: Vec<u8>,
) -> Result<Vec<u8>, ExecError> {
    let response = client
        .post(&next.url)
        .bearer_auth(&next.token)
        .header("x-talon-step", step.step.to_string())
        .header("x-talon-prompts", step.prompts_header())
        .header("x-talon-output", step.output.to_string())
        .header("content-type", "application/octet-stream")
        .timeout(HOP_TIMEOUT)
        .body(activations)
        .send()
        .await
        .map_err(|e| {
            ExecError::StageLost(format!("next pipeline stage {} unreachable: {e}", next.url))
        })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| ExecError::StageLost(format!("next pipeline stage {}: {e}", next.url)))?;
    if !status.is_success() {
        let why = format!(
            "next pipeline stage {} answered {status}: {}",
            next.url,
            String::from_utf8_lossy(&body[..body.len().min(512)])
        );
        // gone or not ready (moving): worth retrying; anything else is not
        return Err(if matches!(status.as_u16(), 404 | 503) {
            ExecError::StageLost(why)
        } else {
            ExecError::Engine(why)
        });
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn steps_read_from_headers_or_are_refused_naming_the_header() {
        let ok = Step::from_headers(&headers(&[
            ("x-talon-step", "0"),
            ("x-talon-prompts", "512,3"),
            ("x-talon-output", "16"),
        ]))
        .unwrap();
        assert_eq!(ok.tokens(), 515);
        assert_eq!(ok.activation_bytes(), 515 * HIDDEN_SKETCH * 2);
        let decode = Step {
            step: 4,
            ..ok.clone()
        };
        assert_eq!(decode.tokens(), 2);
        for (pairs, expected) in [
            (
                vec![("x-talon-prompts", "1"), ("x-talon-output", "1")],
                "x-talon-step is missing",
            ),
            (
                vec![
                    ("x-talon-step", "x"),
                    ("x-talon-prompts", "1"),
                    ("x-talon-output", "1"),
                ],
                "x-talon-step \"x\"",
            ),
            (
                vec![
                    ("x-talon-step", "0"),
                    ("x-talon-prompts", "1,,2"),
                    ("x-talon-output", "1"),
                ],
                "a prompt length",
            ),
            (
                vec![
                    ("x-talon-step", "9"),
                    ("x-talon-prompts", "1"),
                    ("x-talon-output", "3"),
                ],
                "past the batch's 3",
            ),
        ] {
            let err = Step::from_headers(&headers(&pairs)).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn activations_are_sized_by_the_step_and_depend_on_the_input() {
        let stage = Stage {
            head: "m@v1-0".into(),
            index: 0,
            count: 2,
            first_layer: 0,
            layers: 40,
            next: Hop::new(None),
            token: String::new(),
        };
        let step = Step {
            step: 1,
            prompts: vec![10, 20, 30],
            output: 4,
        };
        let a = activations(b"x", &stage, &step);
        assert_eq!(a.len(), 3 * HIDDEN_SKETCH * 2);
        assert_ne!(a, activations(b"y", &stage, &step));
        assert_eq!(next_tokens(&a, &step).len(), 12);
        let huge = Step {
            step: 0,
            prompts: vec![MAX_TOKENS; 64],
            output: 1,
        };
        assert_eq!(huge.activation_bytes(), MAX_ACTIVATION_BYTES);
    }
}
