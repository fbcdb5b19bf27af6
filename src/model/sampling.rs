//! Choosing the next token from (masked) logits: greedy, or temperature + top-p with a seed.

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Highest logit (the first one on ties, as `torch.argmax`).
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set whose mass reaches `top_p`, drawn with a
    /// generator seeded per sequence, so a sequence's draws do not depend on which batch it ran in.
    Sample {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

pub struct Sampler {
    mode: Sampling,
    state: u64,
}

impl Sampler {
    pub fn new(mode: &Sampling, stream: u64) -> Sampler {
        let seed = match mode {
            Sampling::Sample { seed, .. } => *seed,
            Sampling::Greedy => 0,
        };
        Sampler {
            mode: mode.clone(),
            state: seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// SplitMix64: tiny, fast, reproducible across platforms.
    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The chosen token and its probability under the distribution it came from; None when every logit is -inf.
    pub fn choose(&mut self, logits: &[f32]) -> Option<(u32, f32)> {
        let max = max_logit(logits);
        if max == f32::NEG_INFINITY || max.is_nan() {
            return None;
        }
        // First index holding the maximum, as torch.argmax.
        let best = logits.iter().position(|&v| v == max)?;
        match self.mode.clone() {
            Sampling::Greedy => Some((best as u32, 1.0 / softmax_denominator(logits, max))),
            Sampling::Sample {
                temperature, top_p, ..
            } => {
                if temperature <= 0.0 {
                    return Some((best as u32, 1.0 / softmax_denominator(logits, max)));
                }
                let t = temperature as f64;
                let mut probs: Vec<(usize, f64)> = logits
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| (i, ((v - max) as f64 / t).exp()))
                    .collect();
                let total: f64 = probs.iter().map(|p| p.1).sum();
                probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut kept = 0.0;
                let mut cut = probs.len();
                for (k, p) in probs.iter().enumerate() {
                    kept += p.1 / total;
                    if kept >= top_p as f64 {
                        cut = k + 1;
                        break;
                    }
                }
                probs.truncate(cut.max(1));
                let mass: f64 = probs.iter().map(|p| p.1).sum();
                let mut draw = self.next_f64() * mass;
                for &(i, p) in &probs {
                    if draw < p {
                        return Some((i as u32, (p / mass) as f32));
                    }
                    draw -= p;
                }
                probs.last().map(|&(i, p)| (i as u32, (p / mass) as f32))
            }
        }
    }
}

/// `sum(exp(l - max))` over a vocabulary: the probability of the top token is its inverse. Runs every step for
/// every sequence over 131k logits, so it uses a branch-free exp the compiler vectorises (relative error < 2e-6).
fn softmax_denominator(logits: &[f32], max: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += fast_exp(v - max);
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for &v in rest {
        sum += fast_exp(v - max);
    }
    sum
}

/// Largest logit; lane-wise so the compiler vectorises it (runs over 131k logits per sequence per step).
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        if v > max {
            max = v;
        }
    }
    max
}

/// exp(x) for x <= 0 (masked -inf gives 0): 2^(x*log2 e) = 2^i * 2^f, f in [-0.5, 0.5], 2^f by its Taylor series
/// to degree 7 (truncation error < 2e-8). Rounding uses the 1.5*2^23 trick: no libm call, so it vectorises.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
    let t = x * std::f32::consts::LOG2_E;
    let t = if t < -126.0 { -126.0 } else { t };
    let shifted = t + ROUND;
    let i = shifted - ROUND;
    let f = t - i;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129
                        + f * (0.001_333_355_8 + f * (0.000_154_035_3 + f * 0.000_015_252_73))))));
    // 2^i from the integer in `shifted`'s bits (0x4B40_0000 + i), without a float-to-int conversion.
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    // Below 2^-126 the true value is negligible next to the top token's 1.0.
    if t <= -126.0 { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_reports_its_probability() {
        let mut s = Sampler::new(&Sampling::Greedy, 0);
        let (tok, p) = s.choose(&[0.0, 2.0, 2.0, f32::NEG_INFINITY]).unwrap();
        assert_eq!(tok, 1);
        assert!((p - 1.0 / (2.0 + (-2.0f32).exp())).abs() < 1e-6, "{p}");
        assert!(s.choose(&[f32::NEG_INFINITY; 3]).is_none());
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in 0..2000 {
            let x = -(i as f32) * 0.05;
            let (a, b) = (fast_exp(x), x.exp());
            assert!(
                (a - b).abs() <= (3e-7 + 8e-8 * x.abs()) * b + 1e-37,
                "{x}: {a} vs {b}"
            );
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.3 - 2.0).collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let exact: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
        assert!(((softmax_denominator(&logits, max) as f64) - exact).abs() / exact < 1e-5);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p_and_masks() {
        let mode = Sampling::Sample {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let logits = [3.0, 2.9, 0.0, f32::NEG_INFINITY, -5.0];
        let draws = |stream| {
            let mut s = Sampler::new(&mode, stream);
            (0..200)
                .map(|_| s.choose(&logits).unwrap().0)
                .collect::<Vec<_>>()
        };
        let a = draws(1);
        assert_eq!(a, draws(1), "same seed and stream, same draws");
        assert_ne!(a, draws(2), "streams differ");
        assert!(
            a.iter().all(|&t| t == 0 || t == 1),
            "top-p keeps the two likely tokens: {a:?}"
        );
        assert!(a.contains(&0) && a.contains(&1));
    }
}
