//! Token choice from logits: greedy, or temperature sampling narrowed by top-k, top-p and
//! min-p, with a repetition penalty over a window of recent tokens and OpenAI's frequency and
//! presence penalties over the answer so far. Seeded and reproducible; all scratch is allocated
//! once, and no step sorts the whole vocabulary.

/// Candidates examined first when only top-p/min-p narrow the choice (no top-k): enough for
/// nearly every token; the set grows by doubling when their mass is short of top-p.
const NUCLEUS_START: usize = 64;

/// Longest repetition-penalty window: far beyond any context this serves (the penalty ring
/// is allocated for it: a bound keeps a setting from asking for gigabytes).
pub const MAX_REPEAT_LAST_N: usize = 1 << 16;

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely; 0 disables.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens; 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// OpenAI's additive penalty: subtract this times the number of times a token was
    /// generated so far in this answer; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI's additive penalty: subtract this from every token generated so far in this
    /// answer; 0 disables.
    pub presence_penalty: f32,
    /// RNG seed: the same seed, settings and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults, except the seed which is fixed (reproducible unless asked).
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// Below this temperature the choice is argmax: at 1e-5 two logits 0.001 apart already stand
/// e^-100 to 1 (vLLM's epsilon too), and below it `1 / t` times a logit leaves f32 (a
/// temperature of 1e-40 gave NaN scores and a garbage answer).
pub const GREEDY_BELOW: f32 = 1e-5;
/// Highest temperature: beyond it the distribution is flat for any model's logits.
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Largest top_k (more than any vocabulary; 0 is off).
pub const MAX_TOP_K: usize = 1 << 20;
/// The repetition penalty's range: `logit / p` and `logit * p` stay finite.
pub const REPEAT_PENALTY_RANGE: (f32, f32) = (0.01, 100.0);

impl SamplerConfig {
    /// Checks the ranges; the message names the setting.
    ///
    /// # Errors
    /// A value outside its meaningful range.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(format!(
                "temperature must be in [0, {MAX_TEMPERATURE}], got {}",
                self.temperature
            ));
        }
        if self.top_k > MAX_TOP_K {
            return Err(format!("top_k must be at most {MAX_TOP_K}, got {}", self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        let (lo, hi) = REPEAT_PENALTY_RANGE;
        if !(lo..=hi).contains(&self.repeat_penalty) {
            return Err(format!(
                "repeat_penalty must be in [{lo}, {hi}], got {}",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.repeat_last_n > MAX_REPEAT_LAST_N {
            return Err(format!(
                "repeat_last_n must be at most {MAX_REPEAT_LAST_N}, got {}",
                self.repeat_last_n
            ));
        }
        Ok(())
    }

    /// Whether the choice is plain argmax (what an on-chip greedy head can do): temperature 0,
    /// or one too small to tell from it ([`GREEDY_BELOW`]).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW && !self.has_penalties()
    }

    /// Whether any penalty changes the logits.
    pub fn has_penalties(&self) -> bool {
        (self.repeat_last_n > 0 && self.repeat_penalty != 1.0)
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// The sampler: settings, RNG, and scratch sized for the vocabulary.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: fastrand::Rng,
    /// (logit, token) candidates.
    candidates: Vec<(f32, u32)>,
    /// Marks tokens already penalized this step (repeat penalty: once per distinct token).
    seen: Vec<bool>,
    /// Per token, how many times it was generated in this answer (OpenAI's penalties).
    generated: Vec<u32>,
    /// Whether `generated` holds anything to clear.
    generated_any: bool,
    /// Ring of recent tokens for the penalty.
    recent: Vec<u32>,
    recent_pos: usize,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(vocab: usize, cfg: SamplerConfig) -> Sampler {
        let mut s = Sampler {
            rng: fastrand::Rng::with_seed(cfg.seed),
            candidates: Vec::with_capacity(vocab),
            seen: vec![false; vocab],
            generated: vec![0; vocab],
            generated_any: true,
            recent: Vec::with_capacity(cfg.repeat_last_n.max(1)),
            recent_pos: 0,
            cfg,
        };
        s.reset(None);
        s
    }

    /// Starts a new generation with new settings (keeps the buffers when they are big enough).
    pub fn reconfigure(&mut self, cfg: SamplerConfig) {
        if self.recent.capacity() < cfg.repeat_last_n {
            self.recent.reserve(cfg.repeat_last_n - self.recent.len());
        }
        self.cfg = cfg;
        self.reset(None);
    }

    /// Reseeds and clears the penalty window; `history` (e.g. the prompt) fills the window.
    pub fn reset(&mut self, history: Option<&[u32]>) {
        self.rng = fastrand::Rng::with_seed(self.cfg.seed);
        self.recent.clear();
        self.recent_pos = 0;
        if self.generated_any {
            self.generated.fill(0);
            self.generated_any = false;
        }
        if let Some(h) = history {
            for &t in h {
                self.remember(t);
            }
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a generated token (for the repeat window and OpenAI's counts).
    pub fn accept(&mut self, token: u32) {
        if let Some(c) = self.generated.get_mut(token as usize) {
            *c += 1;
            self.generated_any = true;
        }
        self.remember(token);
    }

    /// Puts a token (prompt or generated) in the repeat penalty's window.
    fn remember(&mut self, token: u32) {
        let n = self.cfg.repeat_last_n;
        if n == 0 {
            return;
        }
        if self.recent.len() < n {
            self.recent.push(token);
        } else {
            self.recent[self.recent_pos] = token;
            self.recent_pos = (self.recent_pos + 1) % n;
        }
    }

    /// Chooses the next token. `logits` is modified (penalties applied in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalty(logits);
        if self.cfg.temperature < GREEDY_BELOW {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (l * inv_t, i as u32)));

        let max = self.candidates.iter().fold(f32::NEG_INFINITY, |a, c| a.max(c.0));
        if self.cfg.top_k == 0 && self.cfg.top_p >= 1.0 && self.cfg.min_p <= 0.0 {
            // Plain temperature sampling: draw from the softmax in vocabulary order, no sort.
            return draw(&self.candidates, max, &mut self.rng);
        }
        let weight = |c: &(f32, u32)| (c.0 - max).exp();
        // Narrow to a sorted prefix of the best candidates without sorting them all. With
        // top-k, top-p is measured over the k kept (renormalized, as llama.cpp's chain does
        // it and as the chip's sampling head sees them); without, over the vocabulary.
        let (m, total) = if self.cfg.top_k > 0 {
            let k = self.cfg.top_k.min(self.candidates.len());
            let total = select_top(&mut self.candidates, k).iter().map(weight).sum();
            (k, total)
        } else {
            let k = self.candidates.len();
            let mut m = NUCLEUS_START.min(k);
            let total: f32 = self.candidates.iter().map(weight).sum();
            loop {
                let prefix = select_top(&mut self.candidates, m);
                let mass: f32 = prefix.iter().map(weight).sum::<f32>() / total;
                // The prefix is enough when it holds the top-p mass, or when min-p already
                // cuts inside it.
                let min_p_cut = self.cfg.min_p > 0.0 && prefix.last().is_some_and(|c| weight(c) < self.cfg.min_p);
                if m == k || mass >= self.cfg.top_p || min_p_cut {
                    break (m, total);
                }
                m = (m * 2).min(k);
            }
        };
        let keep = nucleus(
            self.candidates[..m].iter().map(weight),
            total,
            self.cfg.top_p,
            self.cfg.min_p,
        );
        draw(&self.candidates[..keep], max, &mut self.rng)
    }

    /// llama.cpp's multiplicative repetition penalty over the window of recent tokens (prompt
    /// included, once per distinct token), then OpenAI's additive ones over the tokens
    /// generated so far: `logit -= count * frequency_penalty + (count > 0) * presence_penalty`.
    fn apply_penalty(&mut self, logits: &mut [f32]) {
        let p = self.cfg.repeat_penalty;
        if p != 1.0 {
            for &t in &self.recent {
                let i = t as usize;
                if i < logits.len() && !self.seen[i] {
                    self.seen[i] = true;
                    logits[i] = if logits[i] > 0.0 { logits[i] / p } else { logits[i] * p };
                }
            }
            for &t in &self.recent {
                if let Some(s) = self.seen.get_mut(t as usize) {
                    *s = false;
                }
            }
        }
        let (freq, presence) = (self.cfg.frequency_penalty, self.cfg.presence_penalty);
        if (freq != 0.0 || presence != 0.0) && self.generated_any {
            // A pass over the vocabulary (as the candidate list already makes): no list of the
            // answer's tokens to grow.
            for (l, &c) in logits.iter_mut().zip(&self.generated) {
                if c > 0 {
                    *l -= c as f32 * freq + presence;
                }
            }
        }
    }
}

/// How many of the best candidates min-p and top-p keep (at least one), given their
/// weights best first (probabilities up to a common factor) and `total`, the weight top-p is
/// measured against: min-p drops those below `min_p` times the best; top-p keeps the
/// shortest prefix whose share of `total` reaches `top_p` (the one that crosses included).
/// The host sampler and the finishing of the chip's sampling head both cut here.
pub fn nucleus(weights: impl Iterator<Item = f32>, total: f32, top_p: f32, min_p: f32) -> usize {
    let (mut kept, mut cum, mut best) = (0, 0.0f32, None);
    for w in weights {
        let first = *best.get_or_insert(w);
        if kept > 0 && ((min_p > 0.0 && w < min_p * first) || (top_p < 1.0 && cum >= top_p * total)) {
            break;
        }
        cum += w;
        kept += 1;
    }
    kept.max(1)
}

/// Draws one candidate with probability proportional to `exp(logit - max)`.
fn draw(candidates: &[(f32, u32)], max: f32, rng: &mut fastrand::Rng) -> u32 {
    let sum: f32 = candidates.iter().map(|c| (c.0 - max).exp()).sum();
    let mut r = rng.f32() * sum;
    for c in candidates {
        r -= (c.0 - max).exp();
        if r <= 0.0 {
            return c.1;
        }
    }
    candidates[candidates.len() - 1].1
}

/// Index of the largest logit (the first one on ties, as llama.cpp).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Moves the `m` best candidates to the front, sorted best first, in O(n + m log m).
fn select_top(c: &mut [(f32, u32)], m: usize) -> &[(f32, u32)] {
    let by_best = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if m < c.len() {
        c.select_nth_unstable_by(m, by_best);
    }
    let m = m.min(c.len());
    c[..m].sort_unstable_by(by_best);
    &c[..m]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut r = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| r.f32() * 10.0).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(
            100,
            SamplerConfig {
                temperature: 0.0,
                ..Default::default()
            },
        );
        let mut l = logits(100, 1);
        let want = argmax(&l);
        assert_eq!(s.sample(&mut l), want);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(
                1000,
                SamplerConfig {
                    seed,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    temperature: 5.0,
                    ..Default::default()
                },
            );
            (0..50).map(|i| s.sample(&mut logits(1000, i))).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    /// A temperature too small to tell from 0 chooses as 0 does: no `1 / t` overflow into
    /// NaN scores (issue 23 saw "J777" where greedy said " Paris.").
    #[test]
    fn a_tiny_temperature_is_greedy() {
        for t in [1e-40, 1e-36, 1e-30, 1e-6] {
            let cfg = SamplerConfig {
                temperature: t,
                seed: 3,
                ..Default::default()
            };
            assert!(cfg.validate().is_ok(), "{t}");
            assert!(cfg.is_greedy(), "{t}");
            let mut s = Sampler::new(500, cfg);
            for i in 0..50 {
                let mut l = logits(500, i);
                let want = argmax(&l);
                assert_eq!(s.sample(&mut l), want, "temperature {t}");
            }
        }
    }

    #[test]
    fn settings_beyond_their_range_are_refused() {
        for cfg in [
            SamplerConfig {
                temperature: 1e3,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: 1e-40,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: 1e3,
                ..Default::default()
            },
            SamplerConfig {
                top_k: 1 << 40,
                ..Default::default()
            },
        ] {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            500,
            SamplerConfig {
                top_k: 1,
                temperature: 1.0,
                ..Default::default()
            },
        );
        for i in 0..20 {
            let mut l = logits(500, i);
            let want = argmax(&l);
            assert_eq!(s.sample(&mut l), want);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds almost all mass: a small top-p can only ever pick it.
        let mut l = vec![0.0f32; 1000];
        l[123] = 20.0;
        let mut s = Sampler::new(
            1000,
            SamplerConfig {
                top_k: 0,
                top_p: 0.5,
                min_p: 0.0,
                temperature: 1.0,
                ..Default::default()
            },
        );
        for _ in 0..100 {
            assert_eq!(s.sample(&mut l.clone()), 123);
        }
    }

    #[test]
    fn top_p_grows_past_the_first_candidates_when_needed() {
        // A flat distribution: top-p 0.9 needs ~900 of 1000 tokens, far beyond NUCLEUS_START.
        let l = vec![1.0f32; 1000];
        let mut s = Sampler::new(
            1000,
            SamplerConfig {
                top_k: 0,
                top_p: 0.9,
                min_p: 0.0,
                temperature: 1.0,
                seed: 3,
                ..Default::default()
            },
        );
        let picks: std::collections::HashSet<u32> = (0..2000).map(|_| s.sample(&mut l.clone())).collect();
        assert!(picks.len() > 300, "only {} distinct tokens", picks.len());
        assert!(picks.iter().all(|&t| t < 1000));
    }

    #[test]
    fn plain_temperature_follows_the_softmax() {
        // Logits ln(1), ln(2), ln(7): probabilities 0.1, 0.2, 0.7.
        let l = [1f32.ln(), 2f32.ln(), 7f32.ln()];
        let mut s = Sampler::new(
            3,
            SamplerConfig {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                temperature: 1.0,
                seed: 1,
                ..Default::default()
            },
        );
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[s.sample(&mut l.to_vec()) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.2, 0.7]) {
            assert!((*c as f64 / 20000.0 - p).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut l = vec![-100.0f32; 50];
        l[1] = 10.0;
        l[2] = 9.0; // e^-1 = 0.37 of the best: kept at min_p 0.3
        l[3] = 5.0; // e^-5: dropped
        let mut s = Sampler::new(
            50,
            SamplerConfig {
                top_k: 0,
                top_p: 1.0,
                min_p: 0.3,
                temperature: 1.0,
                ..Default::default()
            },
        );
        for _ in 0..300 {
            let t = s.sample(&mut l.clone());
            assert!(t == 1 || t == 2, "picked {t}");
        }
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let mut s = Sampler::new(
            10,
            SamplerConfig {
                temperature: 0.0,
                repeat_penalty: 2.0,
                ..Default::default()
            },
        );
        let base = [0.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(s.sample(&mut base.to_vec()), 1);
        s.accept(1);
        assert_eq!(s.sample(&mut base.to_vec()), 2);
    }

    #[test]
    fn frequency_and_presence_penalties_follow_openai() {
        let mut s = Sampler::new(
            4,
            SamplerConfig {
                temperature: 0.0,
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                ..SamplerConfig::default()
            },
        );
        assert!(!s.config().is_greedy(), "penalties need the host's sampler");
        // Prompt tokens do not count (OpenAI's penalties are over the answer so far).
        s.reset(Some(&[3, 3, 3]));
        for t in [1, 1, 1, 2] {
            s.accept(t);
        }
        let mut logits = vec![1.0, 3.0, 2.0, 1.9];
        // Token 1: 3 - 3 * 0.5 - 0.25 = 1.25; token 2: 2 - 0.5 - 0.25 = 1.25; token 3 wins.
        assert_eq!(s.sample(&mut logits), 3);
        assert_eq!(logits, vec![1.0, 1.25, 1.25, 1.9]);
        // The same counts at the next step (nothing accepted in between)...
        let mut logits = vec![1.0, 3.0, 2.0, 1.9];
        s.sample(&mut logits);
        assert_eq!(logits, vec![1.0, 1.25, 1.25, 1.9]);
        // ...and none after a reset.
        s.reset(None);
        let mut logits = vec![1.0, 3.0, 2.0, 1.9];
        assert_eq!(s.sample(&mut logits), 1);
        assert_eq!(logits, vec![1.0, 3.0, 2.0, 1.9]);
        let bad = SamplerConfig {
            presence_penalty: 2.5,
            ..SamplerConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("presence_penalty"));
    }

    #[test]
    fn nucleus_keeps_the_crossing_candidate_and_cuts_on_min_p() {
        let w = [0.5f32, 0.3, 0.15, 0.05];
        assert_eq!(nucleus(w.into_iter(), 1.0, 0.5, 0.0), 1, "0.5 reached by the first");
        assert_eq!(nucleus(w.into_iter(), 1.0, 0.6, 0.0), 2, "the one that crosses is kept");
        assert_eq!(nucleus(w.into_iter(), 1.0, 1.0, 0.0), 4);
        assert_eq!(nucleus(w.into_iter(), 1.0, 1.0, 0.2), 3, "0.05 < 0.2 x 0.5");
        // Scale-free: weights and total in any common unit.
        assert_eq!(nucleus(w.iter().map(|x| x * 8.0), 8.0, 0.6, 0.2), 2);
        assert_eq!(nucleus(std::iter::empty(), 1.0, 0.5, 0.0), 1);
    }

    /// With top-k, top-p is a share of the k kept: [4, 3, 0.5] at top_k 2 leaves
    /// softmax(4, 3) = (0.731, 0.269); top_p 0.72 keeps only the first (0.731 >= 0.72),
    /// where its share of the whole vocabulary (0.715) would have kept two.
    #[test]
    fn top_p_after_top_k_is_a_share_of_the_k() {
        let mut both = 0;
        for seed in 0..200 {
            let mut s = Sampler::new(
                3,
                SamplerConfig {
                    temperature: 1.0,
                    top_k: 2,
                    top_p: 0.72,
                    min_p: 0.0,
                    seed,
                    ..Default::default()
                },
            );
            let mut l = vec![4.0, 3.0, 0.5];
            both += usize::from(s.sample(&mut l) != 0);
        }
        assert_eq!(both, 0, "only the best token may be drawn");
    }
}
