//! The Sophon backend on the BM1684X simulator (the vendor's libbmrt/libbmlib running the
//! chip's functional model), against the CPU reference backend on the same weights: toy
//! Llama bmodels made by each producer users get theirs from (`sim/toy.sh`): LLM-TPU's
//! Llama2 scripts, the original Llama2-TPU export (and sophon-demo's build of it), and
//! tpu-mlir's `llm_convert.py` with and without `--do_sample`, `--dynamic` and
//! `--use_block_with_kv`.
//!
//! Tolerances: the toy weights are exactly representable in f16 and bf16, so the two
//! backends differ only by the device's arithmetic, which rounds activations to the
//! bmodel's half type between ops: about 2^-11 relative for f16 and 2^-8 for bf16 per
//! rounding, over two layers of ~15 roundings each on logits of magnitude ~1-4. Measured
//! here: see the constants. They are set at a few times the measured error, and far below
//! what a wrong mask constant, a wrong KV position or a wrong RoPE gives (0.17 and more).
//!
//! Every comparison feeds both backends the CPU's own greedy token (teacher forcing), so a
//! near-tie decided differently by the device's rounding does not end the comparison; a
//! bmodel whose lm_head returns the token is held to picking a token whose CPU logit is
//! within the tolerance of the best.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};

use llama_tpu::backend::cpu::{CpuBackend, CpuOptions};
use llama_tpu::backend::sophon::contract::{Embedding, LmHeadOutput, Prefill};
use llama_tpu::backend::sophon::ffi::DataType;
use llama_tpu::backend::sophon::llama::{Picker, HEAD_TOP_P_OFF};
use llama_tpu::backend::sophon::plan::Route;
use llama_tpu::backend::sophon::{SophonBackend, SophonOptions};
use llama_tpu::backend::{Backend, BackendError, Next, Span};
use llama_tpu::sampler::{argmax, SamplerConfig};

/// Measured: 0.0045 (prefill), 0.0034 (decode).
const F16_TOLERANCE: f32 = 0.02;
/// Measured: 0.045.
const BF16_TOLERANCE: f32 = 0.1;

struct Pair {
    tpu: SophonBackend,
    cpu: CpuBackend,
    tolerance: f32,
    // The simulator is one chip per process: one backend on it at a time, from its opening
    // to the end of its teardown. Fields drop in order, so the lock is the last field: first,
    // it was released before the backend closed the device, and the next test's backend
    // opened the simulator while this one was still shutting it down.
    _chip: common::Chip,
}

fn pair(bmodel: &str, gguf: &str, tolerance: f32) -> Pair {
    let chip = common::simulator_chip();
    let lib = common::simulator_lib_dir();
    let dir = common::toy_models();
    let tpu = SophonBackend::open(
        &dir.join(bmodel),
        &SophonOptions {
            lib_dir: Some(lib),
            vocab_hint: Some(258),
            ..SophonOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{bmodel}: {e}"));
    let cpu = CpuBackend::load(
        &dir.join(gguf),
        &CpuOptions {
            threads: 1,
            ..CpuOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{gguf}: {e}"));
    Pair {
        tpu,
        cpu,
        tolerance,
        _chip: chip,
    }
}

/// Settings only the host can apply (min_p): the backend hands back the logits.
/// Sampling over the whole vocabulary (top_k 0): more than a head returns, so the host samples.
fn host_sampling() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.8,
        top_k: 0,
        ..SamplerConfig::default()
    }
}

fn greedy() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    }
}

fn logits(n: Next<'_>) -> Vec<f32> {
    match n {
        Next::Logits(l) => l.to_vec(),
        Next::Token(t) => panic!("expected logits, got token {t}"),
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // NaN counts as infinitely far.
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f32::INFINITY })
        .fold(0.0, f32::max)
}

/// How far the device's answer is from the CPU's logits: the largest logit difference, or
/// for a token, how far below the best the CPU puts it.
fn distance(tpu: Next<'_>, cpu: &[f32]) -> f32 {
    match tpu {
        Next::Logits(l) => max_diff(l, cpu),
        Next::Token(t) => cpu[argmax(cpu) as usize] - cpu[t as usize],
    }
}

const PROMPT: [u32; 5] = [256, 72, 101, 108, 108];

/// Prefill then teacher-forced greedy decoding to `until` positions, comparing every step;
/// returns the worst distance.
fn greedy_run(p: &mut Pair, until: usize) -> f32 {
    forced_run(p, until, &greedy())
}

/// The same with the device configured for `cfg` (host sampling: its logits come back).
fn forced_run(p: &mut Pair, until: usize, cfg: &SamplerConfig) -> f32 {
    p.tpu.configure_sampling(0, cfg).unwrap();
    let c = logits(p.cpu.prefill(&PROMPT, 0).unwrap());
    let mut worst = distance(p.tpu.prefill(&PROMPT, 0).unwrap(), &c);
    let mut t = argmax(&c);
    for pos in PROMPT.len()..until {
        let c = logits(p.cpu.decode(t, pos).unwrap());
        let d = distance(p.tpu.decode(t, pos).unwrap(), &c);
        assert!(d < p.tolerance, "position {pos}: {d} (worst so far {worst})");
        worst = worst.max(d);
        t = argmax(&c);
    }
    worst
}

/// Each toy: its file, the CPU model with the same weights, the tolerance, and what its
/// contract must read (hidden-state type, prefill kind, lm_head kind, io_alone cache).
macro_rules! toy_matches_cpu {
    ($name:ident, $bmodel:literal, $gguf:literal, $tol:expr, $check:expr) => {
        #[test]
        fn $name() {
            let mut p = pair($bmodel, $gguf, $tol);
            let check: fn(&llama_tpu::backend::sophon::contract::LlamaLayout) = $check;
            check(p.tpu.layout());
            let worst = greedy_run(&mut p, PROMPT.len() + 20);
            let picker = p.tpu.token_picker();
            eprintln!("{}: worst distance {worst} (picker {picker:?})", $bmodel);
            // Logits come back (host picker) unless lm_head picks the token itself.
            let expected = match p.tpu.layout().lm_head {
                LmHeadOutput::Token => Picker::LmHead,
                LmHeadOutput::Logits(_) if p.tpu.layout().greedy_head => Picker::Greedy,
                LmHeadOutput::Logits(_) => Picker::Host,
            };
            assert_eq!(picker, expected);
        }
    };
}

toy_matches_cpu!(
    llm_tpu_llama2_layout_matches_the_cpu_backend,
    "toy_llmtpu_f16.bmodel",
    "toy_kv4.gguf",
    F16_TOLERANCE,
    |l| {
        assert_eq!(
            (l.hidden_dtype, l.prefill),
            (DataType::F16, Prefill::Static(DataType::F16))
        );
        assert!(
            !l.cache_in_decode_inputs,
            "LLM-TPU's compile.sh leaves block_cache in the default mode"
        );
        assert_eq!(
            l.sample_head.as_ref().map(|h| h.net.as_str()),
            Some("penalty_sample_head")
        );
    }
);
toy_matches_cpu!(
    original_llama2_tpu_layout_matches_the_cpu_backend,
    "toy_l2t_f16.bmodel",
    "toy_kv4.gguf",
    F16_TOLERANCE,
    |l| {
        assert_eq!(
            (l.hidden_dtype, l.kv_dtype, l.mask_dtype),
            (DataType::F32, DataType::F16, DataType::F32)
        );
        assert!(l.flat_ids && l.lm_head == LmHeadOutput::Token);
    }
);
toy_matches_cpu!(
    sophon_demo_layout_matches_the_cpu_backend,
    "toy_sd_bf16.bmodel",
    "toy_kv4.gguf",
    BF16_TOLERANCE,
    |l| {
        assert_eq!((l.hidden_dtype, l.kv_dtype), (DataType::F32, DataType::Bf16));
        let (_, decode) = l.embedding_nets().unwrap();
        assert_eq!((decode.net.as_str(), decode.stage), ("embedding", 0));
    }
);
toy_matches_cpu!(
    converter_f16_sample_matches_the_cpu_backend,
    "toy_conv_f16_sample.bmodel",
    "toy_kv2.gguf",
    F16_TOLERANCE,
    |l| {
        assert_eq!(
            (l.hidden_dtype, l.prefill, l.kv_heads),
            (DataType::F16, Prefill::Static(DataType::F16), 2)
        );
        assert!(l.cache_in_decode_inputs && l.greedy_head);
        assert_eq!(
            l.sample_head.as_ref().map(|h| (h.net.as_str(), h.dynamic)),
            Some(("sample_head", true))
        );
    }
);
toy_matches_cpu!(
    converter_bf16_matches_the_cpu_backend,
    "toy_conv_bf16.bmodel",
    "toy_kv4.gguf",
    BF16_TOLERANCE,
    |l| {
        assert_eq!((l.hidden_dtype, l.lm_head), (DataType::Bf16, LmHeadOutput::Token));
    }
);
toy_matches_cpu!(
    converter_dynamic_matches_the_cpu_backend,
    "toy_conv_f16_dyn.bmodel",
    "toy_kv2.gguf",
    F16_TOLERANCE,
    |l| {
        assert_eq!(l.prefill, Prefill::Dynamic);
    }
);
toy_matches_cpu!(
    converter_history_matches_the_cpu_backend,
    "toy_conv_f16_hist.bmodel",
    "toy_kv2.gguf",
    F16_TOLERANCE,
    |l| {
        assert_eq!((l.prefill, l.max_input), (Prefill::WithHistory, 8));
        assert_eq!(l.decode_stages, vec![32, 16, 8]);
    }
);

// Qwen2 and Qwen3 (issue 25) through the same converter: the Q/K/V biases and the per-head
// Q/K norms are weights inside the block nets, so the contract reads these builds as it reads
// a Llama's (see `qwen_builds_have_the_nets_of_the_llama_builds`), and the device agrees
// with the CPU backend, which runs the same parts from the GGUF. Measured: Qwen2's logits
// 0.0039 (the Llama build's 0.0045), Qwen3's lm_head token the CPU's best at every step.
/// Qwen2's build: its greedy head's tokens, then its logits themselves (host picker), which
/// the biases move.
#[test]
fn converter_qwen2_f16_sample_matches_the_cpu_backend() {
    let mut p = pair("toy_conv_qwen2_f16_sample.bmodel", "toy_qwen2.gguf", F16_TOLERANCE);
    let l = p.tpu.layout();
    assert_eq!((l.hidden, l.head_dim, l.kv_heads), (64, 16, 2));
    assert!(l.greedy_head && l.sample_head.is_some());
    greedy_run(&mut p, PROMPT.len() + 20);
    assert_eq!(p.tpu.token_picker(), Picker::Greedy);
    p.tpu.reset();
    let worst = forced_run(&mut p, PROMPT.len() + 20, &host_sampling());
    assert_eq!(p.tpu.token_picker(), Picker::Host);
    eprintln!("toy_conv_qwen2_f16_sample.bmodel: worst logit difference {worst}");
}
toy_matches_cpu!(
    converter_qwen3_f16_matches_the_cpu_backend,
    "toy_conv_qwen3_f16.bmodel",
    "toy_qwen3.gguf",
    F16_TOLERANCE,
    |l| {
        // Eight query heads of 16 on a hidden size of 64: nothing in the contract assumes
        // heads x head_dim = hidden.
        assert_eq!((l.hidden, l.head_dim, l.kv_heads), (64, 16, 2));
        assert_eq!(l.lm_head, LmHeadOutput::Token);
    }
);

/// What the runtime says of a bmodel's nets, by name: every input's name, type and shape,
/// every output's type and shape (output names carry the compiler's suffixes), the stages'
/// shapes, dynamic or not, the address mode.
fn net_signatures(bmodel: &str) -> std::collections::BTreeMap<String, String> {
    use llama_tpu::backend::sophon::device::Device;
    use llama_tpu::backend::sophon::ffi::Runtime;
    use llama_tpu::backend::sophon::runtime::Loaded;
    let _chip = common::simulator_chip();
    let rt = std::sync::Arc::new(Runtime::load(Some(&common::simulator_lib_dir())).unwrap());
    let dev = std::sync::Arc::new(Device::open(rt, 0).unwrap());
    let loaded = Loaded::load(dev, &common::toy_models().join(bmodel)).unwrap_or_else(|e| panic!("{bmodel}: {e}"));
    let signatures = loaded
        .nets()
        .iter()
        .map(|n| {
            let inputs: Vec<_> = n.inputs.iter().map(|p| (&p.name, p.dtype, &p.shape)).collect();
            let outputs: Vec<_> = n.outputs.iter().map(|p| (p.dtype, &p.shape)).collect();
            let stages: Vec<_> = n.stages.iter().map(|s| (&s.input_shapes, &s.output_shapes)).collect();
            let signature = format!(
                "inputs {inputs:?} outputs {outputs:?} stages {stages:?} dynamic {} addr_mode {}",
                n.dynamic, n.addr_mode
            );
            (n.name.clone(), signature)
        })
        .collect();
    // The runtime's context goes before the device, and both before the chip's lock.
    drop(loaded);
    signatures
}

/// The proof that Qwen builds need nothing new from the contract: every net of a Qwen2 or
/// Qwen3 bmodel has exactly the inputs and outputs (names, types, shapes, stages) of the same
/// net in the Llama bmodel built with the same flags and sizes, where the biases and norms
/// are not (the toys differ inside the blocks only). Without --do_sample the head nets go and
/// lm_head returns the token, which the contract already reads (`converter_bf16`).
#[test]
fn qwen_builds_have_the_nets_of_the_llama_builds() {
    for (qwen, llama) in [
        ("toy_conv_qwen2_f16_sample.bmodel", "toy_conv_f16_sample.bmodel"),
        ("qwen3_w4f16/toy_qwen3_w4f16.bmodel", "w4f16/toy_w4f16.bmodel"),
    ] {
        let (q, l) = (net_signatures(qwen), net_signatures(llama));
        assert!(
            q.contains_key("block_cache_1") && q.contains_key("sample_head"),
            "{qwen}: {q:?}"
        );
        assert_eq!(q, l, "{qwen} against {llama}");
    }
    let q = net_signatures("toy_conv_qwen3_f16.bmodel");
    let mut l = net_signatures("toy_conv_f16_sample.bmodel");
    for head in ["greedy_head", "sample_head", "lm_head"] {
        l.remove(head);
    }
    let mut blocks = q.clone();
    assert!(blocks.remove("lm_head").is_some());
    assert_eq!(blocks, l, "toy_conv_qwen3_f16 against toy_conv_f16_sample");
}

/// Every position up to the last one the device holds, then an overflow: on a bmodel that
/// keeps the cache in the decode nets' inputs, one whose cache is ours, and one whose decode
/// stages change with the history length.
#[test]
fn the_kv_cache_is_right_up_to_the_context_end_and_no_further() {
    for (bmodel, gguf) in [
        ("toy_conv_f16_sample.bmodel", "toy_kv2.gguf"),
        ("toy_llmtpu_f16.bmodel", "toy_kv4.gguf"),
        ("toy_conv_f16_hist.bmodel", "toy_kv2.gguf"),
    ] {
        let mut p = pair(bmodel, gguf, F16_TOLERANCE);
        let s = p.tpu.info().context_length;
        assert_eq!(s, 32, "the toy's SEQLEN, read from the bmodel");
        let worst = greedy_run(&mut p, s);
        assert!(worst < p.tolerance, "{bmodel}: {worst}");
        match p.tpu.decode(1, s) {
            Err(BackendError::ContextOverflow { pos, context, .. }) => assert_eq!((pos, context), (s, s)),
            Err(e) => panic!("expected a context overflow, got {e}"),
            Ok(_) => panic!("decoding past SEQLEN succeeded"),
        }
        assert!(matches!(
            p.tpu.prefill(&[1; 33], 0),
            Err(BackendError::ContextOverflow { .. })
        ));
        assert!(matches!(p.tpu.prefill(&[258], 0), Err(BackendError::BadToken(258))));
    }
}

/// A conversation continued by `more` tokens after `cached`: the route the cost model
/// chooses for each prefill kind, and the same numbers as the CPU.
fn continue_conversation(p: &mut Pair, cached: usize, more: usize, route: Route) {
    let text: Vec<u32> = (0..cached + more).map(|i| 60 + (i as u32 * 7) % 60).collect();
    p.tpu.reset();
    p.cpu.reset();
    p.tpu.configure_sampling(0, &host_sampling()).unwrap();
    assert_eq!(p.tpu.token_picker(), Picker::Host);
    let a = p.tpu.prefill(&text[..cached], 0).unwrap();
    let b = logits(p.cpu.prefill(&text[..cached], 0).unwrap());
    assert!(distance(a, &b) < p.tolerance);
    let before = p.tpu.traffic().unwrap();
    let a = logits(p.tpu.prefill(&text[cached..], cached).unwrap());
    let syncs = (p.tpu.traffic().unwrap() - before).syncs;
    let b = logits(p.cpu.prefill(&text[cached..], cached).unwrap());
    let d = max_diff(&a, &b);
    let plan = p.tpu.last_plan().unwrap();
    assert_eq!(plan.route, route, "{cached} + {more}: {plan:?}");
    // Launches are asynchronous: the inputs of each group of launches (a prefill chunk, a
    // decode step) are written only once the group before has finished, or a queued launch
    // could read the next group's token, position or mask. One wait per group; on history
    // nets also one per layer, before its history is copied into the net's input (which the
    // launch before may still use).
    let layers = p.tpu.layout().layers as u64;
    let waits = match route {
        Route::Prefill => more.div_ceil(p.tpu.layout().max_input) as u64 * (layers + 1),
        Route::Decode => more as u64,
        Route::Reprefill => 1,
    };
    assert_eq!(syncs, waits, "{cached} + {more} ({route:?}): waits");
    assert!(d < p.tolerance, "{cached} + {more} ({route:?}): {d}");
    // And decoding goes on from there.
    let t = argmax(&b);
    let a = logits(p.tpu.decode(t, cached + more).unwrap());
    let b = logits(p.cpu.decode(t, cached + more).unwrap());
    assert!(max_diff(&a, &b) < p.tolerance);
}

#[test]
fn a_continued_conversation_takes_the_cheaper_route_and_agrees() {
    let mut p = pair("toy_conv_f16_sample.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    // Static prefill (32 positions in 4 launches) against 3 launches per decoded token.
    continue_conversation(&mut p, 6, 1, Route::Decode);
    continue_conversation(&mut p, 6, 9, Route::Reprefill);
    continue_conversation(&mut p, 20, 11, Route::Reprefill);
    drop(p);
    let mut p = pair("toy_llmtpu_f16.bmodel", "toy_kv4.gguf", F16_TOLERANCE);
    continue_conversation(&mut p, 6, 9, Route::Reprefill);
    drop(p);
    let mut p = pair("toy_conv_f16_dyn.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    continue_conversation(&mut p, 6, 3, Route::Reprefill);
    drop(p);
    // History K/V: only the new turn, in chunks of 8 at its offset.
    let mut p = pair("toy_conv_f16_hist.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    continue_conversation(&mut p, 6, 3, Route::Prefill);
    continue_conversation(&mut p, 5, 19, Route::Prefill);
    continue_conversation(&mut p, 17, 1, Route::Prefill);
}

fn token(n: Next<'_>) -> u32 {
    match n {
        Next::Token(t) => t,
        Next::Logits(_) => panic!("expected an on-chip token, got logits"),
    }
}

#[test]
fn greedy_heads_give_the_cpus_tokens() {
    for (bmodel, gguf) in [
        ("toy_conv_f16_sample.bmodel", "toy_kv2.gguf"),
        ("toy_llmtpu_f16.bmodel", "toy_kv4.gguf"),
    ] {
        let mut p = pair(bmodel, gguf, F16_TOLERANCE);
        p.tpu.configure_sampling(0, &greedy()).unwrap();
        assert_eq!(p.tpu.token_picker(), Picker::Greedy, "{bmodel}");
        let mut t = token(p.tpu.prefill(&PROMPT, 0).unwrap());
        let mut c = argmax(&logits(p.cpu.prefill(&PROMPT, 0).unwrap()));
        for pos in PROMPT.len()..PROMPT.len() + 20 {
            assert_eq!(t, c, "{bmodel}: position {pos}");
            t = token(p.tpu.decode(t, pos).unwrap());
            c = argmax(&logits(p.cpu.decode(c, pos).unwrap()));
        }
    }
}

/// What the numpy model of the vendor heads' math (tests/reference/sample_head.py) gives,
/// with the settings the backend writes to the head (its own top-p cut switched off).
fn numpy_head(logits: &[f32], ids: &[u32], cfg: &SamplerConfig, top_k: usize) -> (Vec<f32>, Vec<u32>) {
    let v = sample_model(serde_json::json!({
        "logits": logits, "ids": ids, "penalty": cfg.repeat_penalty,
        "temperature": cfg.temperature, "top_k": top_k, "top_p": HEAD_TOP_P_OFF,
    }));
    let probs = v["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (probs, ids)
}

/// The candidates the request's settings keep, by the numpy model of the host sampler's cut
/// (the same script), from the logits and the ids to penalize.
fn numpy_request(logits: &[f32], ids: &[u32], cfg: &SamplerConfig) -> Vec<u32> {
    let v = sample_model(serde_json::json!({
        "logits": logits, "ids": ids, "penalty": cfg.repeat_penalty,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": cfg.min_p,
    }));
    v["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn sample_model(input: serde_json::Value) -> serde_json::Value {
    let python = std::env::var("LLAMA_TPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/sample_head.py");
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (`make test` sets up .cache/venv with numpy)"));
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the numpy head model failed (it needs numpy: `make test` sets LLAMA_TPU_PYTHON):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The chip's sampling head against the numpy model of its math, on the logits lm_head left
/// and the ids the head was given, over a prompt and several decoded tokens (the penalty
/// window moving), with llama.cpp's top_k 40, a top_p, a min_p and a real penalty; and the
/// host's cut of its candidates against the numpy model of what the request asked for.
/// `head_k`: the candidates the head computes (40; LLM-TPU's, without a top_k input, 50).
fn sampling_head_matches_its_model(bmodel: &str, gguf: &str, head_k: usize) {
    let mut p = pair(bmodel, gguf, F16_TOLERANCE);
    let cfg = SamplerConfig {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.02,
        repeat_penalty: 1.3,
        repeat_last_n: 8,
        seed: 11,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
    };
    p.tpu.configure_sampling(0, &cfg).unwrap();
    p.tpu.record_logits();
    assert_eq!(p.tpu.token_picker(), Picker::Sample, "{bmodel}");
    let mut seen: Vec<u32> = PROMPT.to_vec();
    let mut t = token(p.tpu.prefill(&PROMPT, 0).unwrap());
    for step in 0..6 {
        let logits = p.tpu.recorded_logits().to_vec();
        let given = p.tpu.penalized_ids().unwrap();
        // The window is the last repeat_last_n tokens; a static head's padding repeats one.
        let window: std::collections::BTreeSet<u32> = seen[seen.len().saturating_sub(8)..].iter().copied().collect();
        let given_set: std::collections::BTreeSet<u32> = given.iter().copied().collect();
        assert_eq!(given_set, window, "{bmodel} step {step}: penalized ids");
        let (probs, ids) = p.tpu.candidates();
        let (want_probs, want_ids) = numpy_head(&logits, &given, &cfg, head_k);
        assert_eq!(ids, &want_ids[..], "{bmodel} step {step}: candidates");
        let d = max_diff(probs, &want_probs);
        assert!(d < 1e-4, "{bmodel} step {step}: probabilities differ by {d}");
        // The host's cut is the request's, and the token was drawn from it.
        let kept = &ids[..p.tpu.kept_candidates()];
        let want_kept = numpy_request(&logits, &given, &cfg);
        assert_eq!(kept, &want_kept[..], "{bmodel} step {step}: kept candidates");
        assert!(kept.contains(&t), "{bmodel} step {step}: drew {t}, kept {kept:?}");
        seen.push(t);
        t = token(p.tpu.decode(t, seen.len() - 1).unwrap());
    }
}

#[test]
fn converter_sample_head_matches_the_model_of_its_math() {
    sampling_head_matches_its_model("toy_conv_f16_sample.bmodel", "toy_kv2.gguf", 40);
}

#[test]
fn llm_tpu_penalty_sample_head_matches_the_model_of_its_math() {
    // No top_k input: it always computes its 50, and the host keeps the request's 40.
    sampling_head_matches_its_model("toy_llmtpu_f16.bmodel", "toy_kv4.gguf", 50);
}

/// Each request runs where its settings are honoured exactly: greedy on greedy_head; a top_k
/// the head returns, with any top_p, min_p and repetition penalty, on the sampling head (the
/// host cuts its candidates); the whole vocabulary (top_k 0), more candidates than the head
/// returns, OpenAI's additive penalties or a repetition window longer than the head's ids
/// input, on the host. The engine reports the picker of each (the daemon test reads it).
#[test]
fn each_request_runs_where_it_is_honoured_exactly() {
    let sampled = SamplerConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.0,
        ..SamplerConfig::default()
    };
    let cases = [
        (
            "greedy",
            SamplerConfig {
                temperature: 0.0,
                ..sampled.clone()
            },
            Picker::Greedy,
        ),
        ("top_k 40, top_p 0.9", sampled.clone(), Picker::Sample),
        (
            "top_p 0.05",
            SamplerConfig {
                top_p: 0.05,
                ..sampled.clone()
            },
            Picker::Sample,
        ),
        (
            "min_p 0.1",
            SamplerConfig {
                min_p: 0.1,
                ..sampled.clone()
            },
            Picker::Sample,
        ),
        (
            "top_k 3",
            SamplerConfig {
                top_k: 3,
                ..sampled.clone()
            },
            Picker::Sample,
        ),
        ("the defaults", SamplerConfig::default(), Picker::Sample),
        (
            "top_k 0",
            SamplerConfig {
                top_k: 0,
                ..sampled.clone()
            },
            Picker::Host,
        ),
        (
            "top_k 51",
            SamplerConfig {
                top_k: 51,
                ..sampled.clone()
            },
            Picker::Host,
        ),
        (
            "frequency_penalty",
            SamplerConfig {
                frequency_penalty: 0.5,
                ..sampled.clone()
            },
            Picker::Host,
        ),
        (
            "a window past the head's ids",
            SamplerConfig {
                repeat_penalty: 1.1,
                repeat_last_n: 64,
                ..sampled.clone()
            },
            Picker::Host,
        ),
    ];
    let mut p = pair("toy_conv_f16_sample.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    p.tpu.record_logits();
    for (what, cfg, want) in cases {
        p.tpu.configure_sampling(0, &cfg).unwrap();
        assert_eq!(p.tpu.token_picker(), want, "{what}");
        let next = p.tpu.prefill(&PROMPT, 0).unwrap();
        if want == Picker::Sample {
            let t = token(next);
            // What the chip and the host's cut kept is what the request asked for.
            let logits = p.tpu.recorded_logits().to_vec();
            let given = p.tpu.penalized_ids().unwrap();
            let kept = &p.tpu.candidates().1[..p.tpu.kept_candidates()];
            assert_eq!(kept, &numpy_request(&logits, &given, &cfg)[..], "{what}");
            assert!(kept.contains(&t), "{what}: drew {t}, kept {kept:?}");
        }
    }
}

/// Two requests whose prompts end at the same position with different tokens: the second's
/// penalty window is its own tokens (the vendor rebuilds it from the request on every call),
/// never what the first left on the device; checked against the numpy model of the head
/// on the second prompt's own tokens.
#[test]
fn the_penalty_window_is_rebuilt_from_each_prompt() {
    let cfg = SamplerConfig {
        temperature: 0.7,
        top_k: 50,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 2.0,
        repeat_last_n: 8,
        seed: 5,
        ..SamplerConfig::default()
    };
    let first = [256, 10, 20, 30, 40];
    let second = [256, 72, 101, 108, 111];
    let mut p = pair("toy_llmtpu_f16.bmodel", "toy_kv4.gguf", F16_TOLERANCE);
    p.tpu.record_logits();
    p.tpu.configure_sampling(0, &cfg).unwrap();
    assert_eq!(p.tpu.token_picker(), Picker::Sample);
    p.tpu.prefill(&first, 0).unwrap();
    p.tpu.configure_sampling(0, &cfg).unwrap();
    p.tpu.prefill(&second, 0).unwrap();
    let logits = p.tpu.recorded_logits().to_vec();
    let (want_probs, want_ids) = numpy_head(&logits, &second, &cfg, 50);
    let (probs, ids) = p.tpu.candidates();
    assert_eq!(ids, &want_ids[..], "candidates");
    let d = max_diff(probs, &want_probs);
    assert!(
        d < 1e-4,
        "probabilities differ by {d} from the head's math on the second prompt"
    );
    let given: std::collections::BTreeSet<u32> = p.tpu.penalized_ids().unwrap().into_iter().collect();
    assert_eq!(given, second.into_iter().collect(), "penalized ids");
}

/// The same seed gives the same tokens on the chip, another seed others.
#[test]
fn sampling_on_the_chip_is_seeded() {
    let mut p = pair("toy_conv_f16_sample.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    let run = |p: &mut Pair, seed: u64| {
        let cfg = SamplerConfig {
            temperature: 1.5,
            top_k: 40,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.1,
            repeat_last_n: 16,
            seed,
            ..SamplerConfig::default()
        };
        p.tpu.configure_sampling(0, &cfg).unwrap();
        assert_eq!(p.tpu.token_picker(), Picker::Sample);
        let mut t = token(p.tpu.prefill(&PROMPT, 0).unwrap());
        let mut out = vec![t];
        for pos in PROMPT.len()..PROMPT.len() + 12 {
            t = token(p.tpu.decode(t, pos).unwrap());
            out.push(t);
        }
        out
    };
    let a = run(&mut p, 7);
    assert_eq!(a, run(&mut p, 7), "same seed, same tokens");
    assert_ne!(a, run(&mut p, 8), "another seed, other tokens");
}

#[test]
fn a_corrupt_or_foreign_bmodel_is_refused_with_the_reason() {
    let _chip = common::simulator_chip();
    let lib = common::simulator_lib_dir();
    let dir = common::scratch("sophon-bad");
    let good = std::fs::read(common::toy_models().join("toy_conv_bf16.bmodel")).unwrap();
    let truncated = dir.join("truncated.bmodel");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let opts = SophonOptions {
        lib_dir: Some(lib.clone()),
        ..SophonOptions::default()
    };
    let err = |path: &Path| match SophonBackend::open(path, &opts) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    };
    let e = err(&truncated);
    assert!(e.contains("bmrt_load_bmodel"), "{e}");
    let e = err(&dir.join("missing.bmodel"));
    assert!(e.contains("bmrt_load_bmodel"), "{e}");
    // The wheel's sample bmodel is a real bmodel but not a Llama.
    let foreign: PathBuf = lib.join("../python/tools/soc_infer/demo/Yuv2rgb_0_int8/compilation.bmodel");
    let e = err(&foreign);
    assert!(
        e.contains("does not fit the Llama contract") && e.contains("no block_N nets"),
        "{e}"
    );
    // No runtime where it is looked for.
    let e = match SophonBackend::open(
        &truncated,
        &SophonOptions {
            lib_dir: Some(dir.clone()),
            ..SophonOptions::default()
        },
    ) {
        Ok(_) => panic!("opened without a runtime"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("libbmrt"), "{e}");
}

/// What one prompt and one decoded token ask of the device, on every single-device layout the
/// tests build and for every way a token is picked there: no device-to-device copy of ours;
/// the embedding, each layer and lm_head launched once (and the head); one sync; to the
/// device the token id, its position and the one mask cell that changes (and for the sampling
/// head the token's id in the penalty window); back the token, top_k candidates (id and
/// probability) or the logits.
#[test]
fn a_decoded_token_makes_no_device_copy_and_moves_only_what_changes() {
    use llama_tpu::backend::Traffic;
    let sampled = SamplerConfig {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.0,
        repeat_penalty: 1.1,
        repeat_last_n: 16,
        seed: 3,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
    };
    use Picker::{Greedy, Host, LmHead, Sample};
    // LLM-TPU's head has no top_k input: it returns its 50, of which the host keeps 40.
    let all50 = sampled.clone();
    let toys = [
        (
            "toy_llmtpu_f16.bmodel",
            vec![(greedy(), Greedy), (host_sampling(), Host), (all50, Sample)],
        ),
        ("toy_l2t_f16.bmodel", vec![(greedy(), LmHead)]),
        ("toy_sd_bf16.bmodel", vec![(greedy(), LmHead)]),
        (
            "toy_conv_f16_sample.bmodel",
            vec![(greedy(), Greedy), (sampled.clone(), Sample), (host_sampling(), Host)],
        ),
        ("toy_conv_bf16.bmodel", vec![(greedy(), LmHead)]),
        (
            "toy_conv_f16_dyn.bmodel",
            vec![(greedy(), Greedy), (sampled.clone(), Sample)],
        ),
        (
            "toy_conv_f16_hist.bmodel",
            vec![(greedy(), Greedy), (sampled.clone(), Sample)],
        ),
        // No embedding nets: a token's row goes to the device instead of its id.
        ("w4bf16/toy_w4bf16.bmodel", vec![(greedy(), Greedy)]),
        // The Qwen builds' nets are these builds' (qwen_builds_have_the_nets_of_the_llama_builds):
        // what moves per token follows from the nets alone.
    ];
    for (bmodel, configs) in toys {
        let mut p = pair(bmodel, "toy_kv2.gguf", F16_TOLERANCE);
        let l = p.tpu.layout().clone();
        let cell = l.mask_dtype.size() as u64;
        let vocab = p.tpu.info().vocab_size as u64;
        for (cfg, expected) in configs {
            p.tpu.reset();
            p.tpu.configure_sampling(0, &cfg).unwrap();
            let picker = p.tpu.token_picker();
            assert_eq!(picker, expected, "{bmodel}: {cfg:?}");
            let head = u64::from(matches!(picker, Picker::Greedy | Picker::Sample));
            // An embedding table: the host writes the row (no embedding launch).
            let table = l.embedding == Embedding::Table;
            let token_in = if table {
                (l.hidden * l.hidden_dtype.size()) as u64
            } else {
                4
            };
            let embedding_launch = u64::from(!table);
            let top_k = match (&l.sample_head, picker) {
                (Some(h), Picker::Sample) if h.top_k.is_some() && cfg.top_k > 0 => cfg.top_k as u64,
                (Some(h), _) => h.candidates as u64,
                (None, _) => 0,
            };
            let read = match picker {
                Picker::Greedy | Picker::LmHead => 4,
                Picker::Sample => top_k * 8,
                Picker::Host => vocab * 4,
            };
            let traffic = |p: &Pair| p.tpu.traffic().unwrap();
            let t0 = traffic(&p);
            let first = next_token(p.tpu.prefill(&PROMPT, 0).unwrap());
            let prompt = traffic(&p) - t0;
            let t1 = traffic(&p);
            let second = next_token(p.tpu.decode(first, PROMPT.len()).unwrap());
            let first_step = traffic(&p) - t1;
            let t2 = traffic(&p);
            next_token(p.tpu.decode(second, PROMPT.len() + 1).unwrap());
            let step = traffic(&p) - t2;
            eprintln!("{bmodel} {picker:?}\n  prompt of {}: {prompt:?}\n  first step: {first_step:?}\n  decoded token: {step:?}", PROMPT.len());
            let what = format!("{bmodel}, picker {picker:?}");
            // A steady-state decoded token.
            let window = if picker == Picker::Sample { 4 } else { 0 };
            assert_eq!(
                step,
                Traffic {
                    launches: l.layers as u64 + 1 + embedding_launch + head,
                    syncs: 1,
                    h2d_calls: 3 + u64::from(window > 0),
                    h2d_bytes: token_in + 4 + cell + window,
                    d2h_calls: if picker == Picker::Sample { 2 } else { 1 },
                    d2h_bytes: read,
                    d2d_calls: 0,
                    d2d_bytes: 0,
                },
                "{what}: decoded token"
            );
            assert!(table || step.h2d_bytes <= 12 + window, "{what}");
            // The first step after a prompt lays out the whole decode mask (of the shortest
            // decode stage that holds the history).
            let kv = l
                .decode_stages
                .iter()
                .copied()
                .filter(|&s| s > PROMPT.len())
                .min()
                .unwrap() as u64;
            assert_eq!(
                first_step.h2d_bytes,
                token_in + 4 + (kv + 1) * cell + window,
                "{what}: first step"
            );
            // A prompt: its ids or rows (and the sampling head's window), the same reads, and
            // no copy but where a dynamic chunk is too short for the runtime's check of a
            // slice of the cache (docs/tpu.md): then K and V are copied in, per layer, each
            // copy waiting for its launch.
            let launches = match l.prefill {
                Prefill::WithHistory => {
                    (PROMPT.len().div_ceil(l.max_input) as u64 * (l.layers as u64 + embedding_launch)) + 1
                }
                _ => l.layers as u64 + 1 + embedding_launch,
            };
            let kv_row = (l.kv_heads * l.head_dim * l.kv_dtype.size()) as u64;
            let copied = !matches!(l.prefill, Prefill::Static(_))
                && (PROMPT.len() as u64 * kv_row).div_ceil(4096) * 4096 < l.max_input as u64 * kv_row;
            let copies = if copied { 2 * l.layers as u64 } else { 0 };
            let ids_window = match (&l.sample_head, picker) {
                (Some(h), Picker::Sample) if h.dynamic => PROMPT.len().min(cfg.repeat_last_n) as u64 * 4,
                (Some(h), Picker::Sample) => h.ids_len as u64 * 4,
                _ => 0,
            };
            assert_eq!(
                (
                    prompt.launches,
                    prompt.syncs,
                    prompt.d2d_calls,
                    prompt.h2d_bytes,
                    prompt.d2h_bytes
                ),
                (
                    launches + head,
                    1 + copies / 2,
                    copies,
                    PROMPT.len() as u64 * token_in + ids_window,
                    read
                ),
                "{what}: prompt of {}",
                PROMPT.len()
            );
        }
    }
}

fn next_token(n: Next<'_>) -> u32 {
    match n {
        Next::Token(t) => t,
        Next::Logits(l) => argmax(l),
    }
}

/// A libsophon older than 0.5.1 has the same function names with shorter structures (no
/// `input_mems` in `bm_stage_info_t`, a 120-byte `bm_net_info_t`): reading them with this
/// backend's layout would read garbage, not fail. A fake runtime with exactly 0.4.8's symbols
/// (whose network info is in the old layout) is refused before any structure is read, with the
/// version needed; the CLI says so with exit 69.
#[test]
fn a_runtime_older_than_0_5_1_is_refused_before_any_structure_is_read() {
    // It uses no chip, but runs alone all the same: it is the only test that loads both cores
    // (a compiler, a subprocess) while a simulator test may run, and twice a simulator test
    // gave results that were off on a full suite, never alone. Whether the simulator's engine
    // threads misbehave when starved is not known; nothing runs beside the chip now.
    let _chip = common::simulator_chip();
    let dir = common::scratch("old-libsophon");
    let bmlib = r#"
        typedef struct { unsigned long long addr; unsigned int r; int fd; unsigned int flags; unsigned int size; } mem_t;
        int bm_dev_getcount(int *n) { *n = 1; return 0; }
        int bm_dev_request(void **h, int i) { static int x; *h = &x; return 0; }
        void bm_dev_free(void *h) {}
        int bm_malloc_device_byte(void *h, mem_t *m, unsigned int n) { return 1; }
        void bm_free_device(void *h, mem_t m) {}
        int bm_memcpy_s2d(void *h, mem_t m, void *p) { return 1; }
        int bm_memcpy_s2d_partial(void *h, mem_t m, void *p, unsigned int n) { return 1; }
        int bm_memcpy_d2s(void *h, void *p, mem_t m) { return 1; }
        int bm_memcpy_d2s_partial(void *h, void *p, mem_t m, unsigned int n) { return 1; }
        int bm_memcpy_d2d_byte(void *h, mem_t d, unsigned long a, mem_t s, unsigned long b, unsigned long n) { return 1; }
        int bm_thread_sync(void *h) { return 0; }
    "#;
    // libsophon 0.4.8's bmrt: no bmrt_set_flags, no bmrt_create_ex; the old structures.
    let bmrt = r#"
        typedef struct { int num_dims; int dims[8]; } shape_t;
        typedef struct { shape_t *input_shapes, *output_shapes; } old_stage_t;
        typedef struct { const char *name; _Bool dyn; int input_num; const char **input_names;
            int *input_dtypes; float *input_scales; int output_num; const char **output_names;
            int *output_dtypes; float *output_scales; int stage_num; old_stage_t *stages;
            unsigned long *max_in, *max_out; int *izp, *ozp; } old_net_t;
        static shape_t shape = {2, {1, 32}};
        static old_stage_t stage = {&shape, &shape};
        static const char *names[] = {"embedding"};
        static int dtypes[] = {6};
        static old_net_t net = {"embedding", 0, 1, names, dtypes, 0, 1, names, dtypes, 0, 1, &stage};
        static int x;
        void *bmrt_create(void *h) { return &x; }
        void bmrt_destroy(void *p) {}
        _Bool bmrt_load_bmodel(void *p, const char *f) { return 1; }
        int bmrt_get_network_number(void *p) { return 1; }
        void bmrt_get_network_names(void *p, const char ***n) { *n = 0; }
        const old_net_t *bmrt_get_network_info(void *p, const char *n) { return &net; }
        _Bool bmrt_launch_tensor_ex(void *p, const char *n, const void *i, int a, void *o, int b, _Bool c, _Bool d) { return 0; }
        void bmrt_tensor_with_device(void *t, int m, int d, int s) {}
    "#;
    for (name, source) in [("libbmlib.so", bmlib), ("libbmrt.so", bmrt)] {
        let c = dir.join(name.replace(".so", ".c"));
        std::fs::write(&c, source).unwrap();
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(name))
            .arg(&c)
            .status()
            .expect("cc (gcc) builds the fake runtime");
        assert!(status.success(), "cc failed on {name}");
    }
    let e = match llama_tpu::backend::sophon::ffi::Runtime::load(Some(&dir)) {
        Ok(_) => panic!("a 0.4.8 runtime was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("older than libsophon 0.5.1") && e.contains("bmrt_set_flags") && e.contains("0.5.1 or newer"),
        "{e}"
    );
    let bmodel = dir.join("any.bmodel");
    std::fs::write(&bmodel, b"not read").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llama-tpu"))
        .arg("info")
        .arg(&bmodel)
        .arg("--sophon-lib")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("libsophon 0.5.1 or newer"), "{stderr}");
}

/// A prompt of 200 tokens: two of the 128-token chunks a `--use_block_with_kv` build of
/// SEQLEN 512 prefills in (the converter's default chunk, SEQLEN / 4).
fn long_prompt() -> Vec<u32> {
    std::iter::once(256)
        .chain((0..199).map(|i| 97 + (i * 7 % 26) as u32))
        .collect()
}

/// The logits of both backends over a long prompt and `steps` teacher-forced decoded tokens
/// (host picker: the logits come back; a build whose lm_head picks the token: how far below
/// the CPU's best logit its token's is): the worst difference, and how many of the steps'
/// greedy tokens agree.
fn w4_run(p: &mut Pair, prompt: &[u32], steps: usize) -> (f32, usize) {
    p.tpu.configure_sampling(0, &host_sampling()).unwrap();
    let picker = match p.tpu.layout().lm_head {
        LmHeadOutput::Token => Picker::LmHead,
        LmHeadOutput::Logits(_) => Picker::Host,
    };
    assert_eq!(p.tpu.token_picker(), picker);
    let compare = |n: Next<'_>, c: &[f32]| {
        let chosen = match n {
            Next::Logits(l) => argmax(l),
            Next::Token(t) => t,
        };
        (distance(n, c), usize::from(chosen == argmax(c)))
    };
    let c = logits(p.cpu.prefill(prompt, 0).unwrap());
    let (mut worst, mut agree) = compare(p.tpu.prefill(prompt, 0).unwrap(), &c);
    let mut token = argmax(&c);
    for pos in prompt.len()..prompt.len() + steps - 1 {
        let c = logits(p.cpu.decode(token, pos).unwrap());
        let (d, a) = compare(p.tpu.decode(token, pos).unwrap(), &c);
        worst = worst.max(d);
        agree += a;
        token = argmax(&c);
    }
    (worst, agree)
}

/// Measured: 0.0038 over the prompt and 16 tokens (logits of magnitude ~1-4: the chip's
/// half-precision arithmetic on the same int4 weights), where a wrong group size gives 1.7
/// and a swapped zero point 3.1.
const W4_F16_TOLERANCE: f32 = 0.02;
/// Measured: 0.024 (bf16 keeps 3 fewer bits); wrong readings 1.7 and 3.1.
const W4_BF16_TOLERANCE: f32 = 0.1;

/// What sophon-demo and LLM-TPU users run: int4 weights in groups of 64 (-q w4f16 / w4bf16),
/// made by the compiler itself, in real models' shapes (SEQLEN 512, head_dim 128, GQA), a
/// prompt of two prefill chunks; against the CPU backend on the same dequantized weights
/// (sim/w4_model.py reads them from what the converter kept). The same comparison with the
/// weights read with a wrong group size or zero point is far off: the check can fail.
fn w4_matches_the_cpu_backend(dir: &str, tolerance: f32) {
    let (worst, agree) = w4_agrees(dir, (Prefill::WithHistory, 512), tolerance, &long_prompt(), 16);
    assert!(worst < tolerance, "{dir}: {worst}");
    assert_eq!(agree, 16, "{dir}");
    let bmodel = format!("{dir}/toy_{dir}.bmodel");
    for wrong in ["wrong_group", "wrong_zero_point"] {
        let mut p = pair(&bmodel, &format!("{dir}/{wrong}.gguf"), tolerance);
        let (worst, _) = w4_run(&mut p, &long_prompt(), 1);
        eprintln!("{dir} against {wrong}: {worst}");
        assert!(worst > 4.0 * tolerance, "{dir}: a {wrong} reading is as close: {worst}");
    }
}

/// A W4 build against the CPU backend on its dequantized weights: the worst logit difference
/// over `prompt` and `steps` decoded tokens, and how many greedy tokens agree.
fn w4_agrees(
    dir: &str,
    (prefill, seq): (Prefill, usize),
    tolerance: f32,
    prompt: &[u32],
    steps: usize,
) -> (f32, usize) {
    let bmodel = format!("{dir}/toy_{dir}.bmodel");
    let mut p = pair(&bmodel, &format!("{dir}/toy_{dir}.gguf"), tolerance);
    let l = p.tpu.layout().clone();
    assert_eq!((l.seq_len, l.head_dim, l.kv_heads), (seq, 128, 1));
    // Chunked prefill after history takes the converter's default chunk (SEQLEN / 4).
    let chunk = if prefill == Prefill::WithHistory {
        l.seq_len / 4
    } else {
        l.seq_len
    };
    assert_eq!((l.prefill, l.max_input), (prefill, chunk), "{dir}");
    let (worst, agree) = w4_run(&mut p, prompt, steps);
    eprintln!("{dir}: worst logit difference {worst}, greedy agreement {agree}/{steps}");
    (worst, agree)
}

/// Qwen2 (biases) and Qwen3 (Q/K norms, 4 query heads of 128 on hidden 256) as users run them:
/// W4F16, one without --do_sample (lm_head picks the token: held to the CPU's best; SEQLEN
/// 128, static) and one with it and chunked prefill after history (logits compared). A prompt
/// of 40 tokens and 8 steps: the long prompt's chunking is the Llama build's test, and these
/// builds' nets are its nets.
#[test]
fn qwen_w4f16_builds_match_the_cpu_backend_on_their_dequantized_weights() {
    let prompt = &long_prompt()[..40];
    for (dir, prefill, seq) in [
        ("qwen2_w4f16", Prefill::Static(DataType::F16), 128),
        ("qwen3_w4f16", Prefill::WithHistory, 512),
    ] {
        let (worst, agree) = w4_agrees(dir, (prefill, seq), W4_F16_TOLERANCE, prompt, 8);
        assert!(worst < W4_F16_TOLERANCE, "{dir}: {worst}");
        assert_eq!(agree, 8, "{dir}");
    }
}

#[test]
fn w4f16_matches_the_cpu_backend_on_its_dequantized_weights() {
    w4_matches_the_cpu_backend("w4f16", W4_F16_TOLERANCE);
}

/// The W4BF16 build is also an `--embedding_disk` one: no embedding nets; the host gathers
/// rows of config/embedding.bin beside it.
#[test]
fn w4bf16_without_embedding_nets_matches_the_cpu_backend() {
    w4_matches_the_cpu_backend("w4bf16", W4_BF16_TOLERANCE);
}

/// An `--embedding_disk` bmodel whose table is missing or of another size is refused at
/// load, saying what was looked for and expected; `--embedding-table` names one elsewhere.
#[test]
fn a_missing_or_wrong_embedding_table_is_refused() {
    let _chip = common::simulator_chip();
    let toys = common::toy_models();
    let dir = common::scratch("sophon-table");
    let bmodel = dir.join("model.bmodel");
    std::fs::copy(toys.join("w4bf16/toy_w4bf16.bmodel"), &bmodel).unwrap();
    let open = |table: Option<PathBuf>| {
        SophonBackend::open(
            &bmodel,
            &SophonOptions {
                lib_dir: Some(common::simulator_lib_dir()),
                embedding_table: table,
                ..SophonOptions::default()
            },
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let e = open(None).unwrap_err();
    assert!(
        e.contains("embedding table was not found") && e.contains("config/embedding.bin"),
        "{e}"
    );
    let table = std::fs::read(toys.join("w4bf16/config/embedding.bin")).unwrap();
    std::fs::write(dir.join("embedding.bin"), &table[..table.len() - 512]).unwrap();
    let e = open(None).unwrap_err();
    assert!(e.contains(&format!("expected {}", table.len())), "{e}");
    let elsewhere = dir.join("elsewhere.bin");
    std::fs::write(&elsewhere, &table).unwrap();
    open(Some(elsewhere)).unwrap();
}

/// Slots on the chip: a converter bmodel with io_alone decode blocks holds several KV caches
/// (each its own device buffers). Two conversations interleaved in slots 0 and 1, one engine
/// step each, give the tokens each gives alone: greedy on the chip's head, and seeded sampling
/// with a penalty window (rebuilt from its own tokens whenever its slot's turn comes). A
/// slot's turn after the other's moves its conversation into the working caches (two copies
/// per layer each way, counted exactly); a slot that keeps its turn copies nothing. LLM-TPU's
/// bmodel (decode blocks in the default address mode) holds one slot and refuses more, with
/// the reason.
#[test]
fn two_interleaved_conversations_give_the_tokens_each_gives_alone() {
    let mut p = pair("toy_conv_f16_sample.bmodel", "toy_kv2.gguf", F16_TOLERANCE);
    assert!(p.tpu.info().slots >= 2, "slots: {}", p.tpu.info().slots);
    let prompts = [PROMPT.to_vec(), vec![256, 87, 111, 114, 108, 100, 33, 32, 87]];
    let settings = [
        greedy(),
        SamplerConfig {
            temperature: 0.9,
            top_k: 20,
            repeat_penalty: 1.5,
            repeat_last_n: 6,
            seed: 9,
            ..SamplerConfig::default()
        },
    ];
    const STEPS: usize = 14;
    let mut alone = Vec::new();
    for k in 0..2 {
        p.tpu.configure_sampling(0, &settings[k]).unwrap();
        let mut t = next_token(p.tpu.prefill(&prompts[k], 0).unwrap());
        let mut tokens = vec![t];
        for i in 0..STEPS {
            t = next_token(p.tpu.decode(t, prompts[k].len() + i).unwrap());
            tokens.push(t);
        }
        alone.push(tokens);
    }
    assert_eq!(p.tpu.picker(0), "sample_head");

    for (slot, cfg) in settings.iter().enumerate() {
        p.tpu.configure_sampling(slot, cfg).unwrap();
    }
    assert_eq!((p.tpu.picker(0), p.tpu.picker(1)), ("greedy_head", "sample_head"));
    let mut together: Vec<Vec<u32>> = vec![Vec::new(); 2];
    let span = |slot: usize, start: usize, len: usize, decode: bool| Span {
        slot,
        start,
        len,
        output: true,
        decode,
    };
    let tokens: Vec<u32> = prompts.concat();
    let spans = [span(0, 0, prompts[0].len(), false), span(1, 0, prompts[1].len(), false)];
    p.tpu
        .step(&tokens, &spans, &mut |i, n| together[spans[i].slot].push(next_token(n)))
        .unwrap();
    let before = p.tpu.traffic().unwrap();
    for i in 0..STEPS {
        let last = [together[0][i], together[1][i]];
        let spans = [
            span(0, prompts[0].len() + i, 1, true),
            span(1, prompts[1].len() + i, 1, true),
        ];
        p.tpu
            .step(&last, &spans, &mut |j, n| together[spans[j].slot].push(next_token(n)))
            .unwrap();
    }
    let traffic = p.tpu.traffic().unwrap() - before;
    assert_eq!(together, alone, "interleaved in two slots vs one after the other");
    // Per step, two turns: each saves the leaving slot's new row and loads the coming one's
    // rows, K and V, every layer.
    let layers = p.tpu.layout().layers as u64;
    assert_eq!(traffic.d2d_calls, STEPS as u64 * 2 * 4 * layers, "{traffic:?}");
    // Slot 0 alone from here: its first turn brings it in, then nothing moves.
    let mut t = *together[0].last().unwrap();
    let mut pos = prompts[0].len() + STEPS;
    t = next_token(p.tpu.decode(t, pos).unwrap());
    pos += 1;
    let before = p.tpu.traffic().unwrap();
    for _ in 0..4 {
        t = next_token(p.tpu.decode(t, pos).unwrap());
        pos += 1;
    }
    assert_eq!((p.tpu.traffic().unwrap() - before).d2d_calls, 0);
    drop(p);

    let chip = common::simulator_chip();
    let refused = SophonBackend::open(
        &common::toy_models().join("toy_llmtpu_f16.bmodel"),
        &SophonOptions {
            lib_dir: Some(common::simulator_lib_dir()),
            slots: Some(2),
            ..SophonOptions::default()
        },
    )
    .err()
    .expect("two slots on a bmodel whose decode blocks are not io_alone")
    .to_string();
    assert!(refused.contains("not io_alone"), "{refused}");
    drop(chip);
}
