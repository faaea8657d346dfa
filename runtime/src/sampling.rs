//! Choosing the next token: greedy at temperature 0, otherwise from the
//! softmax at the temperature, cut to the smallest set whose probability
//! reaches `top_p`, drawn from a generator seeded per request (the same
//! seed, the same text); and stop sequences.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// How a request wants its tokens chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Text that ends the answer (not included in it).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

/// Most stop sequences a request may give, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

impl SamplingParams {
    /// Checks the parameters, saying which is out of range.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err(Error::Request(format!(
                "temperature {} must be between 0 and 2",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Request(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::Request("max_tokens must be at least 1".into()));
        }
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(String::is_empty) {
            return Err(Error::Request(format!(
                "stop takes 1 to {MAX_STOPS} non-empty strings"
            )));
        }
        Ok(())
    }
}

/// A request's token chooser.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    order: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            order: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature < 1e-5 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f32> = logits.iter().map(|l| ((l - max) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        self.order.sort_unstable_by(|a, b| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        });
        // the nucleus: the most likely tokens until top_p is reached
        let mut kept = 0.0;
        let mut end = 0;
        for &i in &self.order {
            kept += probs[i as usize] / total;
            end += 1;
            if kept >= self.params.top_p {
                break;
            }
        }
        let nucleus = &self.order[..end];
        let mass: f32 = nucleus.iter().map(|&i| probs[i as usize]).sum();
        let mut draw = self.rng.random::<f32>() * mass;
        for &i in nucleus {
            draw -= probs[i as usize];
            if draw <= 0.0 {
                return i;
            }
        }
        nucleus[end - 1]
    }
}

/// The highest logit's token (the lowest id on a tie, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Where the first stop sequence starts in `text`, searching from `from`
/// (a byte offset; earlier text was searched before).
pub fn find_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let start = from.saturating_sub(s.len());
            let start = (start..=from.min(text.len())).find(|i| text.is_char_boundary(*i))?;
            text[start..].find(s.as_str()).map(|at| start + at)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_seeded_and_nucleus_sampling() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(greedy.sample(&logits), 1);
        let draws = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..Default::default()
            });
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let mut top = Sampler::new(SamplingParams {
            top_p: 0.4,
            seed: Some(1),
            ..Default::default()
        });
        // 1 holds 0.48 of the mass: 0.4 keeps it alone
        assert!((0..100).all(|_| top.sample(&logits) == 1));
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().to_string().contains("top_p 0"));
    }

    #[test]
    fn stops_are_found_across_the_old_and_new_text() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n", &stops, 0), None);
        assert_eq!(find_stop("abc\n\nmore", &stops, 4), Some(3));
        assert_eq!(find_stop("xxEN", &stops, 3), None);
        assert_eq!(find_stop("xxENDyy", &stops, 4), Some(2));
        assert_eq!(find_stop("é\n\n", &stops, 1), Some(2));
    }
}
