//! How a prompt goes through the chip: the cost model that decides, for tokens at positions
//! `start..start + n`, between the prefill nets and one decode step per token. Pure: a
//! layout and two numbers in, a route and its cost out.
//!
//! Cost is counted in what the chip does: launches (each streams one net's weights from
//! device memory) and positions computed (each costs about two operations per weight). A
//! static prefill computes all of its `max_input` positions, padding included; a dynamic one
//! only the prompt's; a decode step one position. Their relative price comes from the
//! BM1684X's published Llama-2-7B int4 figures (sophon-demo, S = 512): first token 0.731 s,
//! 97.5 ms per token. With 34 launches in each, one position costs about 1.24 ms and one
//! launch about 2.83 ms, so a launch is worth 2.3 positions at 32 layers. A launch streams one
//! layer's weights and a position touches all layers', so that worth scales as 1 / layers:
//! [`positions_per_launch`] is 73 / layers.

use super::contract::{LlamaLayout, Prefill};

/// A launch's cost in positions computed (see the module documentation).
pub fn positions_per_launch(layers: usize) -> f64 {
    73.0 / layers.max(1) as f64
}

/// Which nets run a prompt's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The prefill nets from position `start`, in launches of at most `max_input` tokens
    /// (from 0, or after the history on bmodels with `block_kv_N` nets).
    Prefill,
    /// The whole conversation again from position 0: cheaper than decoding the new tokens.
    Reprefill,
    /// One decode step per token (the prefill nets start at 0 and hold only `max_input`;
    /// a static prefill's first `max_input` tokens still go through them).
    Decode,
}

/// A route with what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// The route.
    pub route: Route,
    /// Nets launched, lm_head included (an on-chip head adds one).
    pub launches: usize,
    /// Positions computed.
    pub positions: usize,
}

impl Plan {
    /// Cost in positions (launches priced by [`positions_per_launch`]).
    pub fn cost(&self, layers: usize) -> f64 {
        self.launches as f64 * positions_per_launch(layers) + self.positions as f64
    }
}

/// The cheapest route for `n` tokens at positions `start..start + n` (`start` tokens already
/// in the cache).
pub fn plan(layout: &LlamaLayout, start: usize, n: usize) -> Plan {
    let (layers, max_input) = (layout.layers, layout.max_input.max(1));
    // One launch of the prefill nets: the embedding and every block.
    let prefill_launch = layers + 1;
    let prefill_positions = |tokens: usize| match layout.prefill {
        Prefill::Static(_) => max_input,
        Prefill::Dynamic | Prefill::WithHistory => tokens,
    };
    let decode = |tokens: usize| Plan {
        route: Route::Decode,
        launches: tokens * (layers + 1) + 1,
        positions: tokens,
    };
    if layout.prefill == Prefill::WithHistory {
        let chunks = n.div_ceil(max_input);
        return Plan {
            route: Route::Prefill,
            launches: chunks * prefill_launch + 1,
            positions: n,
        };
    }
    if start == 0 {
        if n <= max_input {
            return Plan {
                route: Route::Prefill,
                launches: prefill_launch + 1,
                positions: prefill_positions(n),
            };
        }
        // The first max_input tokens by prefill, the rest decoded.
        let rest = decode(n - max_input);
        return Plan {
            route: Route::Prefill,
            launches: prefill_launch + rest.launches,
            positions: prefill_positions(max_input) + rest.positions,
        };
    }
    let by_decode = decode(n);
    if start + n <= max_input {
        let again = Plan {
            route: Route::Reprefill,
            launches: prefill_launch + 1,
            positions: prefill_positions(start + n),
        };
        if again.cost(layers) < by_decode.cost(layers) {
            return again;
        }
    }
    by_decode
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sophon::contract::{LmHeadOutput, NetStage};
    use crate::backend::sophon::ffi::DataType;

    fn layout(layers: usize, s: usize, max_input: usize, prefill: Prefill) -> LlamaLayout {
        let stage = |net: &str| NetStage {
            net: net.into(),
            stage: 0,
        };
        LlamaLayout {
            layers,
            seq_len: s,
            max_input,
            hidden: 4096,
            kv_heads: 32,
            devices: 1,
            head_dim: 128,
            hidden_dtype: DataType::F16,
            kv_dtype: DataType::F16,
            mask_dtype: DataType::F16,
            prefill,
            embedding: crate::backend::sophon::contract::Embedding::Nets {
                prefill: stage("embedding"),
                decode: stage("embedding_cache"),
                devices: 1,
            },
            flat_ids: false,
            decode_stages: vec![s],
            cache_in_decode_inputs: true,
            lm_head: LmHeadOutput::Token,
            greedy_head: false,
            sample_head: None,
        }
    }

    #[test]
    fn a_fresh_prompt_is_prefilled() {
        let l = layout(32, 512, 512, Prefill::Static(DataType::F16));
        let p = plan(&l, 0, 20);
        assert_eq!((p.route, p.launches, p.positions), (Route::Prefill, 34, 512));
        let d = layout(32, 512, 512, Prefill::Dynamic);
        assert_eq!(plan(&d, 0, 20).positions, 20);
        // Longer than the prefill nets: the rest decoded.
        let short = layout(2, 32, 8, Prefill::Static(DataType::F16));
        let p = plan(&short, 0, 10);
        assert_eq!(
            (p.route, p.launches, p.positions),
            (Route::Prefill, 3 + 2 * 3 + 1, 8 + 2)
        );
    }

    /// Llama-2-7B's shape: a 200-token turn after 100 cached tokens is one prefill (34
    /// launches, 512 positions) instead of 200 decode steps (6601 launches); a 3-token turn
    /// stays three decode steps; the break-even is where the published timings put it.
    #[test]
    fn a_continued_conversation_is_prefilled_when_that_is_cheaper() {
        let l = layout(32, 512, 512, Prefill::Static(DataType::F16));
        let p = plan(&l, 100, 200);
        assert_eq!((p.route, p.launches, p.positions), (Route::Reprefill, 34, 512));
        assert_eq!(plan(&l, 100, 200 - 1).route, Route::Reprefill);
        let p = plan(&l, 100, 3);
        assert_eq!((p.route, p.launches, p.positions), (Route::Decode, 3 * 33 + 1, 3));
        // 0.731 s / 97.5 ms: re-prefilling pays from the 8th token on.
        let first = (1..100).find(|&n| plan(&l, 100, n).route == Route::Reprefill);
        assert_eq!(first, Some(8));
        // It must fit the prefill nets.
        assert_eq!(plan(&l, 500, 20).route, Route::Decode);
        // Dynamic prefill computes only the conversation's positions: it pays sooner.
        let d = layout(32, 512, 512, Prefill::Dynamic);
        assert_eq!(plan(&d, 100, 3).route, Route::Reprefill);
        assert_eq!(plan(&l, 100, 3).route, Route::Decode);
    }

    #[test]
    fn history_bmodels_prefill_only_the_new_turn() {
        let l = layout(32, 512, 128, Prefill::WithHistory);
        let p = plan(&l, 100, 200);
        assert_eq!((p.route, p.launches, p.positions), (Route::Prefill, 2 * 33 + 1, 200));
    }
}
