//! Counters and histograms of the daemon's work, in Prometheus' text format for `/metrics`.
//! Updated with relaxed atomics once per request (never per token); read by whoever asks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::Summary;

/// How requests ended: the engine's reasons, then requests that failed.
const OUTCOMES: [&str; 10] = [
    "eos",
    "length",
    "stop",
    "cancelled",
    "time_limit",
    "context",
    "slow_client",
    "refused",
    "invalid",
    "device",
];

/// What picks tokens (the backend's `picker`): the host sampler, or a head on the chip.
const PICKERS: [&str; 4] = ["host", "greedy_head", "sample_head", "lm_head"];

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BOUNDS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds (tokens per second) of the generation-speed buckets.
const RATE_BOUNDS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// A histogram with fixed buckets (counts per bucket, not cumulative, until rendered).
struct Histogram {
    bounds: &'static [f64; 10],
    buckets: [AtomicU64; 11],
    /// The sum in millionths.
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64; 10]) -> Histogram {
        Histogram {
            bounds,
            buckets: Default::default(),
            sum_micro: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: f64) {
        if !v.is_finite() || v < 0.0 {
            return;
        }
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// See the module documentation.
pub struct Metrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    pickers: [AtomicU64; PICKERS.len()],
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    slot_hits: AtomicU64,
    generated_tokens: AtomicU64,
    ttft: Histogram,
    rate: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            outcomes: Default::default(),
            pickers: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            slot_hits: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(&TTFT_BOUNDS),
            rate: Histogram::new(&RATE_BOUNDS),
        }
    }
}

fn outcome_index(name: &str) -> usize {
    OUTCOMES.iter().position(|o| *o == name).unwrap_or(OUTCOMES.len() - 1)
}

impl Metrics {
    /// A request the engine ran.
    pub fn done(&self, s: &Summary) {
        let reason = s.reason.as_str();
        self.outcomes[outcome_index(reason)].fetch_add(1, Ordering::Relaxed);
        if let Some(i) = PICKERS.iter().position(|p| *p == s.picker) {
            self.pickers[i].fetch_add(1, Ordering::Relaxed);
        }
        self.prompt_tokens.fetch_add(s.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens.fetch_add(s.cached_tokens as u64, Ordering::Relaxed);
        if s.cached_tokens > 0 {
            self.slot_hits.fetch_add(1, Ordering::Relaxed);
        }
        self.generated_tokens
            .fetch_add(s.completion_tokens as u64, Ordering::Relaxed);
        if s.completion_tokens > 0 {
            self.ttft.observe(s.time_to_first_token.as_secs_f64());
        }
        if s.completion_tokens > 1 {
            self.rate.observe(s.generation_tokens_per_second());
        }
    }

    /// A request that failed with the protocol's error `code` (run or not).
    pub fn failed(&self, code: &str) {
        let outcome = match code {
            "busy" | "shutting_down" => "refused",
            "device" => "device",
            _ => "invalid",
        };
        self.outcomes[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus' text exposition format; the gauges are read by the caller: `running` of
    /// `slots` requests at once.
    pub fn render(&self, queue_depth: usize, running: usize, slots: usize, connections: u64) -> String {
        let busy = running > 0;
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP llama_tpu_requests_total Requests by how they ended.\n# TYPE llama_tpu_requests_total counter\n",
        );
        for (name, n) in OUTCOMES.iter().zip(&self.outcomes) {
            let _ = writeln!(
                out,
                "llama_tpu_requests_total{{outcome=\"{name}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP llama_tpu_requests_by_picker_total Requests the engine ran, by what picked their tokens (host: the host sampler on the logits; the others: heads on the chip).\n# TYPE llama_tpu_requests_by_picker_total counter\n",
        );
        for (name, n) in PICKERS.iter().zip(&self.pickers) {
            let _ = writeln!(
                out,
                "llama_tpu_requests_by_picker_total{{picker=\"{name}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP llama_tpu_prompt_tokens_total Prompt tokens of finished requests.\n# TYPE llama_tpu_prompt_tokens_total counter\nllama_tpu_prompt_tokens_total {}",
            self.prompt_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_cached_prompt_tokens_total Prompt tokens found in a slot's KV cache (not computed again).\n# TYPE llama_tpu_cached_prompt_tokens_total counter\nllama_tpu_cached_prompt_tokens_total {}",
            self.cached_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_slot_hits_total Requests that found part of their prompt in a slot's KV cache.\n# TYPE llama_tpu_slot_hits_total counter\nllama_tpu_slot_hits_total {}",
            self.slot_hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_generated_tokens_total Generated tokens.\n# TYPE llama_tpu_generated_tokens_total counter\nllama_tpu_generated_tokens_total {}",
            self.generated_tokens.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_device_errors_total Device failures (the daemon exits on one).\n# TYPE llama_tpu_device_errors_total counter\nllama_tpu_device_errors_total {}",
            self.outcomes[outcome_index("device")].load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_queue_depth Requests waiting.\n# TYPE llama_tpu_queue_depth gauge\nllama_tpu_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_busy 1 while the engine runs a request.\n# TYPE llama_tpu_busy gauge\nllama_tpu_busy {}",
            u8::from(busy)
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_slots_busy Slots (KV caches) serving a request.\n# TYPE llama_tpu_slots_busy gauge\nllama_tpu_slots_busy {running}\n# HELP llama_tpu_slots Slots (KV caches): requests served at once.\n# TYPE llama_tpu_slots gauge\nllama_tpu_slots {slots}"
        );
        let _ = writeln!(
            out,
            "# HELP llama_tpu_connections Open socket and serial connections.\n# TYPE llama_tpu_connections gauge\nllama_tpu_connections {connections}"
        );
        self.ttft.render(
            &mut out,
            "llama_tpu_time_to_first_token_seconds",
            "From the start of a request to its first token.",
        );
        self.rate.render(
            &mut out,
            "llama_tpu_generation_tokens_per_second",
            "Generation speed of a request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FinishReason;
    use std::time::Duration;

    #[test]
    fn counts_and_buckets() {
        let m = Metrics::default();
        let mut s = Summary {
            reason: FinishReason::Eos,
            prompt_tokens: 10,
            cached_tokens: 0,
            completion_tokens: 5,
            dropped_messages: 0,
            prompt_time: Duration::from_millis(100),
            time_to_first_token: Duration::from_millis(300),
            picker: "sample_head",
            generation_time: Duration::from_millis(400),
        };
        m.done(&s);
        s.reason = FinishReason::Cancelled;
        s.cached_tokens = 7;
        m.done(&s);
        m.failed("busy");
        let text = m.render(2, 3, 4, 3);
        assert!(text.contains("llama_tpu_cached_prompt_tokens_total 7\n"), "{text}");
        assert!(text.contains("llama_tpu_slot_hits_total 1\n"));
        assert!(text.contains("llama_tpu_slots_busy 3\n"));
        assert!(text.contains("llama_tpu_slots 4\n"));
        assert!(text.contains("llama_tpu_requests_total{outcome=\"eos\"} 1\n"), "{text}");
        assert!(text.contains("llama_tpu_requests_total{outcome=\"cancelled\"} 1\n"));
        assert!(text.contains("llama_tpu_requests_total{outcome=\"refused\"} 1\n"));
        assert!(text.contains("llama_tpu_generated_tokens_total 10\n"));
        assert!(text.contains("llama_tpu_requests_by_picker_total{picker=\"sample_head\"} 2\n"));
        assert!(text.contains("llama_tpu_requests_by_picker_total{picker=\"host\"} 0\n"));
        assert!(text.contains("llama_tpu_time_to_first_token_seconds_bucket{le=\"0.25\"} 0\n"));
        assert!(text.contains("llama_tpu_time_to_first_token_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("llama_tpu_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("llama_tpu_time_to_first_token_seconds_count 2\n"));
        assert!(text.contains("llama_tpu_queue_depth 2\nllama_tpu_busy 1\n") || text.contains("llama_tpu_busy 1\n"));
    }
}
