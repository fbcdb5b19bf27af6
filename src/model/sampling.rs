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
    /// Whether callers want each chosen token's probability. Greedy decoding without it is a max/argmax scan
    /// only: the softmax denominator's exp over 131k logits is most of the host time per sequence per step.
    probabilities: bool,
}

/// SplitMix64: tiny, fast, reproducible across platforms. Advances `state` and returns the next value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
            probabilities: true,
        }
    }

    /// Whether `choose` computes more than an argmax (a probability, or a draw).
    pub fn computes_probabilities(&self) -> bool {
        self.probabilities || self.mode != Sampling::Greedy
    }

    /// Skips computing the chosen token's probability when decoding greedily (`choose` then reports NaN).
    pub fn without_probabilities(mut self) -> Sampler {
        self.probabilities = false;
        self
    }

    fn next_f64(&mut self) -> f64 {
        (splitmix64(&mut self.state) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The chosen token and its probability under the distribution it came from; None when every logit is -inf.
    pub fn choose(&mut self, logits: &[f32]) -> Option<(u32, f32)> {
        if !self.computes_probabilities() {
            return argmax_scan(logits).map(|i| (i as u32, f32::NAN));
        }
        // One read of the logits: max, its first index (as torch.argmax) and the softmax denominator.
        let scan = greedy_scan(logits);
        if scan.max == f32::NEG_INFINITY || scan.max.is_nan() {
            return None;
        }
        let best = scan.first_max?;
        let max = scan.max;
        match self.mode.clone() {
            Sampling::Greedy => Some((best as u32, 1.0 / scan.denominator)),
            Sampling::Sample {
                temperature, top_p, ..
            } => {
                if temperature <= 0.0 {
                    return Some((best as u32, 1.0 / scan.denominator));
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

/// Lanes of the vectorised loops: 16 f32 = two AVX2 registers (or one AVX-512), enough independent sums to hide
/// the add latency.
const LANES: usize = 16;

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (checked once per call; the check is cached by std),
/// else for the baseline x86-64 / other targets. The loops over 131k logits per sequence per step are most of the
/// engine's host time at batch 8; the baseline target only has 4-wide SSE2.
macro_rules! multiversion {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty, $generic:ident) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn widest($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports the features `widest` was compiled for (checked just above).
                    return unsafe { widest($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `wide` was compiled for (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

multiversion!(greedy_scan(logits: &[f32]) -> Scan, greedy_scan_blocks);
multiversion!(argmax_scan(logits: &[f32]) -> Option<usize>, argmax_blocks);

/// First index of the largest logit (as torch.argmax); None when every logit is -inf or NaN. The lane-wise max
/// runs at memory speed; the first index is then searched in the block that holds the max.
#[inline(always)]
fn argmax_blocks(logits: &[f32]) -> Option<usize> {
    let (mut max, mut best_block) = (f32::NEG_INFINITY, 0usize);
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        let m = max_logit_lanes(block);
        if m > max {
            max = m;
            best_block = b;
        }
    }
    if max == f32::NEG_INFINITY {
        return None;
    }
    let start = best_block * BLOCK;
    first_index_of_lanes(&logits[start..], max).map(|i| start + i)
}

/// What greedy decoding needs from one row of logits.
#[derive(Debug, Clone, Copy)]
struct Scan {
    max: f32,
    /// First index holding `max`; None when every logit is -inf or NaN.
    first_max: Option<usize>,
    /// `sum(exp(l - max))`.
    denominator: f32,
}

/// Logits per block: 16 KB, so the block's second pass (exp-sum) reads L1 instead of memory. A row of 131k logits
/// is 512 KB and a batch's 4 MB: three separate passes over it were memory-bound (0.11 ms per row per step).
const BLOCK: usize = 4096;

/// Blockwise max + exp-sum, combined across blocks by rescaling (the online-softmax identity
/// `sum_b * exp(max_b - max)`), then the first index of the max searched in the block that holds it.
#[inline(always)]
fn greedy_scan_blocks(logits: &[f32]) -> Scan {
    let (mut max, mut sum, mut best_block) = (f32::NEG_INFINITY, 0f32, 0usize);
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        let m = max_logit_lanes(block);
        if m == f32::NEG_INFINITY || m.is_nan() {
            continue;
        }
        let s = softmax_denominator_lanes(block, m);
        if m > max {
            sum = sum * fast_exp(max - m) + s;
            max = m;
            best_block = b;
        } else {
            sum += s * fast_exp(m - max);
        }
    }
    let first_max = if max == f32::NEG_INFINITY {
        None
    } else {
        let start = best_block * BLOCK;
        first_index_of_lanes(&logits[start..], max).map(|i| start + i)
    };
    Scan {
        max,
        first_max,
        denominator: sum,
    }
}

/// `sum(exp(l - max))` over a vocabulary: the probability of the top token is its inverse. Runs every step for
/// every sequence over 131k logits, so it uses a branch-free exp the compiler vectorises (relative error < 2e-6).
#[inline(always)]
fn softmax_denominator_lanes(logits: &[f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = logits.chunks_exact(LANES);
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

/// Largest logit; lane-wise so the compiler vectorises it.
#[inline(always)]
fn max_logit_lanes(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
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

/// First index holding `value` (as torch.argmax picks the first maximum): whole chunks are tested with a
/// vectorised any-equal, then the hit chunk is scanned.
#[inline(always)]
fn first_index_of_lanes(logits: &[f32], value: f32) -> Option<usize> {
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.len() * LANES;
    for (c, chunk) in chunks.enumerate() {
        let mut hit = false;
        for &v in chunk {
            hit |= v == value;
        }
        if hit {
            return chunk
                .iter()
                .position(|&v| v == value)
                .map(|i| c * LANES + i);
        }
    }
    logits[tail..]
        .iter()
        .position(|&v| v == value)
        .map(|i| tail + i)
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
        let mut quick = Sampler::new(&Sampling::Greedy, 0).without_probabilities();
        let (tok, p) = quick.choose(&[0.0, 2.0, 2.0, f32::NEG_INFINITY]).unwrap();
        assert_eq!(tok, 1);
        assert!(p.is_nan());
        assert!(quick.choose(&[f32::NEG_INFINITY; 3]).is_none());
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
        assert!(((softmax_denominator_lanes(&logits, max) as f64) - exact).abs() / exact < 1e-5);
    }

    #[test]
    fn blockwise_scan_equals_the_plain_definition() {
        // Several blocks, the maximum repeated in a later block (the first one wins), -inf and a masked block.
        let mut logits: Vec<f32> = (0..3 * BLOCK + 77)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.013 - 6.0)
            .collect();
        logits[BLOCK + 5] = 9.5;
        logits[2 * BLOCK + 1] = 9.5;
        logits[..BLOCK]
            .iter_mut()
            .for_each(|v| *v = f32::NEG_INFINITY);
        logits[3 * BLOCK + 10] = f32::NEG_INFINITY;
        let scan = greedy_scan(&logits);
        assert_eq!(scan.max, 9.5);
        assert_eq!(scan.first_max, Some(BLOCK + 5));
        let exact: f64 = logits.iter().map(|&v| ((v - 9.5) as f64).exp()).sum();
        assert!(
            ((scan.denominator as f64) - exact).abs() / exact < 1e-5,
            "{} vs {exact}",
            scan.denominator
        );
        assert_eq!(argmax_scan(&logits), Some(BLOCK + 5));
        let all_masked = vec![f32::NEG_INFINITY; 100];
        assert_eq!(greedy_scan(&all_masked).first_max, None);
        assert_eq!(argmax_scan(&all_masked), None);
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
