//! Rotary position embeddings and their scaling variants, as Hugging Face
//! computes them: default, linear (positions interpolated), dynamic NTK
//! (the base grows past the trained context) and Llama 3's frequency-band
//! scaling. Pairs are `(i, i + head_dim/2)` ("rotate half").

use serde_json::Value;

/// How the rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f32,
    },
    Dynamic {
        factor: f32,
        original_max: usize,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max: usize,
    },
}

impl RopeScaling {
    /// Reads `rope_scaling` (or `rope_parameters`), saying what is wrong.
    pub fn parse(v: Option<&Value>, max_positions: usize) -> Result<RopeScaling, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |name: &str| -> Result<f32, String> {
            let n = v
                .get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("rope scaling {kind:?} needs a number {name}"))?;
            if n.is_finite() && n > 0.0 {
                Ok(n as f32)
            } else {
                Err(format!("rope scaling {name} {n} must be positive"))
            }
        };
        let original = |fallback: usize| {
            v.get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(fallback, |n| n as usize)
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: number("factor")?,
                original_max: original(max_positions),
            },
            "llama3" => {
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                if high <= low {
                    return Err(format!(
                        "rope scaling high_freq_factor {high} must exceed low_freq_factor {low}"
                    ));
                }
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max: original(8192),
                }
            }
            other => {
                return Err(format!(
                    "rope scaling {other:?} is not supported by the native executor (default, linear, dynamic, llama3 are)"
                ))
            }
        })
    }
}

/// The rotary tables of a model: inverse frequencies per pair.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    theta: f32,
    scaling: RopeScaling,
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, scaling: RopeScaling) -> Rope {
        let inv_freq = match &scaling {
            RopeScaling::Dynamic { .. } | RopeScaling::None => base_freqs(head_dim, theta),
            RopeScaling::Linear { factor } => base_freqs(head_dim, theta)
                .iter()
                .map(|f| f / factor)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max,
            } => {
                let old = *original_max as f32;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                base_freqs(head_dim, theta)
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope {
            head_dim,
            theta,
            scaling,
            inv_freq,
        }
    }

    /// The inverse frequencies in force for a sequence `seq_len` long
    /// (only dynamic scaling depends on it).
    pub fn freqs(&self, seq_len: usize) -> std::borrow::Cow<'_, [f32]> {
        match self.scaling {
            RopeScaling::Dynamic {
                factor,
                original_max,
            } if seq_len > original_max => {
                let d = self.head_dim as f32;
                let grown = factor * seq_len as f32 / original_max as f32 - (factor - 1.0);
                let base = self.theta * grown.powf(d / (d - 2.0));
                std::borrow::Cow::Owned(base_freqs(self.head_dim, base))
            }
            _ => std::borrow::Cow::Borrowed(&self.inv_freq),
        }
    }

    /// Rotates one head's vector `x` (head_dim long) for `position`.
    pub fn apply(freqs: &[f32], x: &mut [f32], position: usize) {
        let half = x.len() / 2;
        for (i, f) in freqs.iter().enumerate().take(half) {
            let angle = position as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos - b * sin;
            x[i + half] = b * cos + a * sin;
        }
    }
}

fn base_freqs(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_length_and_position_zero_is_identity() {
        let rope = Rope::new(8, 10_000.0, RopeScaling::None);
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        let before = x.clone();
        Rope::apply(&rope.freqs(1), &mut x, 0);
        assert_eq!(x, before);
        Rope::apply(&rope.freqs(1), &mut x, 37);
        assert!((norm(&x) - norm(&before)).abs() < 1e-3);
        assert_ne!(x, before);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let base = Rope::new(64, 500_000.0, RopeScaling::None);
        let scaled = Rope::new(
            64,
            500_000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max: 8192,
            },
        );
        let (b, s) = (base.freqs(1), scaled.freqs(1));
        assert_eq!(b[0], s[0]);
        assert!((s[31] - b[31] / 8.0).abs() < 1e-12);
        let dynamic = Rope::new(
            64,
            10_000.0,
            RopeScaling::Dynamic {
                factor: 2.0,
                original_max: 100,
            },
        );
        assert_eq!(dynamic.freqs(100)[5], base_freqs(64, 10_000.0)[5]);
        assert!(dynamic.freqs(400)[5] < base_freqs(64, 10_000.0)[5]);
    }
}
