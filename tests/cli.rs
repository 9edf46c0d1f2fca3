//! The `llama-tpu` binary as a user meets it: help, output, and clear errors with documented
//! exit codes for every kind of bad input.
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use llama_tpu::model::gguf::writer::{write, Meta};
use llama_tpu::model::GgmlType;

fn bin() -> Command {
    common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_everywhere() {
    for sub in [&[][..], &["run"], &["info"], &["tokenize"], &["bench"]] {
        let mut args = sub.to_vec();
        args.push("--help");
        let o = run(&args);
        assert!(o.status.success(), "{args:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage:"), "{args:?}: {out}");
    }
    let o = run(&["--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Exit codes"));
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["run", "--temperature=-1", "hi"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("temperature"), "{}", stderr(&o));
    let m = common::default_model();
    let o = run(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--chat",
        "--chat-template",
        "vicuna",
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("chatml, qwen2.5, qwen3, llama2, llama3, llama3.1, llama3.2"),
        "{}",
        stderr(&o)
    );
}

fn bad_model(name: &str, bytes: &[u8]) -> (std::path::PathBuf, Output) {
    let dir = common::scratch("cli-bad");
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let o = run(&["run", "-m", p.to_str().unwrap(), "-n", "1", "hi"]);
    (p, o)
}

fn assert_refused(p: &Path, o: &Output, code: i32, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{e}");
    assert!(
        e.contains(&p.display().to_string()),
        "error does not name the file: {e}"
    );
    assert!(e.contains(needle), "error does not say '{needle}': {e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_model_files_are_refused_clearly() {
    let o = run(&["run", "-m", "/nonexistent/model.gguf", "hi"]);
    assert_eq!(o.status.code(), Some(66));
    assert!(stderr(&o).contains("/nonexistent/model.gguf"));

    let (p, o) = bad_model("magic.gguf", b"NOT A GGUF FILE AT ALL, JUST TEXT");
    assert_refused(&p, &o, 65, "not a GGUF file");

    let real = std::fs::read(common::default_model()).unwrap();
    let (p, o) = bad_model("truncated.gguf", &real[..real.len() / 2]);
    assert_refused(&p, &o, 65, "truncated");
    let (p, o) = bad_model("header-only.gguf", &real[..100_000]);
    assert_refused(&p, &o, 65, "truncated");

    let arch = write(&[("general.architecture", Meta::Str("mamba".into()))], &[]);
    let (p, o) = bad_model("arch.gguf", &arch);
    assert_refused(&p, &o, 65, "unsupported architecture 'mamba'");

    let tensors = [("token_embd.weight", vec![256, 10], GgmlType::Q5K, vec![0u8; 10 * 176])];
    let meta = [
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(128)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.context_length", Meta::U32(32)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Meta::StrArray((0..10).map(|i| format!("t{i}")).collect()),
        ),
    ];
    let (p, o) = bad_model("q5k.gguf", &write(&meta, &tensors));
    assert_refused(&p, &o, 65, "unsupported tensor type Q5_K in tensor 'token_embd.weight'");
}

#[test]
fn tokenize_prints_ids_on_one_line() {
    let m = common::default_model();
    let o = run(&["tokenize", "-m", m.to_str().unwrap(), "Hello world"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "19556 905\n");
    let o = run(&["tokenize", "-m", m.to_str().unwrap(), "<|im_start|>user"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "1 4093\n",
        "special tokens are parsed"
    );
}

#[test]
fn run_reads_the_prompt_from_stdin_and_reports_timings() {
    let m = common::default_model();
    let mut child = bin()
        .args([
            "run",
            "-m",
            m.to_str().unwrap(),
            "--chat",
            "--temperature",
            "0",
            "-n",
            "30",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France? Answer in one sentence.")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Paris"));
    let e = stderr(&o);
    assert!(
        e.contains("tokens/s") && e.contains("first token") && e.contains("stop: eos"),
        "{e}"
    );
}

#[test]
fn info_describes_the_model() {
    let m = common::default_model();
    let o = run(&["info", m.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "llama (30 layers, hidden 576, FFN 1536)",
        "9 heads, 3 KV heads, head dim 64",
        "Q4_1 x210",
        "Q8_0 x1",
        "byte-level BPE",
        "chatml",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn bench_prints_figures() {
    let m = common::default_model();
    let o = run(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "8",
        "-r",
        "1",
        "-t",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| pp16 |") && out.contains("| tg8 |"), "{out}");
}

#[test]
fn bench_parallel_prints_a_row_per_count() {
    let m = common::default_model();
    let o = run(&[
        "bench",
        "-m",
        m.to_str().unwrap(),
        "--parallel",
        "1,3",
        "--parallel-prompt",
        "8",
        "-n",
        "6",
        "-r",
        "1",
        "-t",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for n in [1, 3] {
        let row = out
            .lines()
            .find(|l| l.contains(&format!("| {n} | 8, 6 |")))
            .unwrap_or_else(|| panic!("no row for {n}: {out}"));
        let rate: f64 = row
            .split('|')
            .nth(6)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rate > 0.0, "{row}");
    }
    let o = run(&["bench", "-m", m.to_str().unwrap(), "--parallel", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// Slots whose KV caches do not fit in the available memory are refused at start, with the
/// numbers (a small box is the test build's fault point lowering the figure).
#[test]
fn slots_that_do_not_fit_are_refused_with_the_numbers() {
    let m = common::default_model();
    let args = |slots: &'static str| {
        vec![
            "run".to_string(),
            "-m".into(),
            m.display().to_string(),
            "--slots".into(),
            slots.into(),
            "--max-tokens".into(),
            "1".into(),
            "Hi".into(),
        ]
    };
    // 90 MiB per slot at the default context of 4096 tokens.
    let o = bin()
        .args(args("2"))
        .env("LLAMA_TPU_FAULT_MEM_AVAILABLE_MIB", "150")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(
        err.contains("2 slots need 180 MiB of KV cache (90 MiB each), but 150 MiB"),
        "{err}"
    );
    let o = bin()
        .args(args("1"))
        .env("LLAMA_TPU_FAULT_MEM_AVAILABLE_MIB", "150")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bin().args(args("0")).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// The service unit lets the daemon open every device node bmlib needs for the TPU (and,
/// with DevicePolicy=closed, nothing else but serial ports).
#[test]
fn the_unit_allows_every_device_node_bmlib_opens() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/llama-tpu.service")).unwrap();
    let allowed: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("DeviceAllow="))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(unit.contains("DevicePolicy=closed"));
    for (node, why) in llama_tpu::backend::sophon::ffi::DEVICE_NODES {
        // A numbered family is allowed by its driver's name (char-bm-sophon).
        let family = node
            .strip_suffix('N')
            .map(|n| format!("char-{}", n.trim_start_matches("/dev/")));
        assert!(
            allowed.contains(&node) || family.as_deref().is_some_and(|f| allowed.contains(&f)),
            "{node} ({why}) is not allowed by the unit: {allowed:?}"
        );
    }
}

/// Every numeric setting has a range: out of it, a flag is a command-line error (2) and a file
/// value a configuration error (78), said before any model is loaded; none of them reaches the
/// code it would have broken (a year-long-plus request_timeout overflowed the clock and
/// panicked the engine; a huge repeat_last_n aborted on its allocation).
#[test]
fn settings_out_of_range_are_refused_with_the_right_code() {
    let dir = common::scratch("ranges");
    let socket = dir.join("s.sock");
    let socket = socket.to_str().unwrap();
    let huge = u64::MAX.to_string();
    for (flag, value) in [
        ("--request-timeout", huge.as_str()),
        ("--request-timeout", "31536001"),
        ("--queue-depth", "100000"),
        ("--max-connections", "0"),
        ("--threads", "100000"),
    ] {
        let o = run(&["serve", "--socket", socket, flag, value]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    for (key, value) in [
        ("request_timeout", huge.as_str()),
        ("request_timeout", "31536001"),
        ("threads", "5000"),
        ("queue_depth", "0"),
    ] {
        let file = dir.join("c.toml");
        std::fs::write(&file, format!("{key} = {value}\n")).unwrap();
        let o = run(&["serve", "--socket", socket, "--config", file.to_str().unwrap()]);
        let code = o.status.code();
        // u64::MAX does not fit TOML's i64: a parse error, also 78.
        assert_eq!(code, Some(78), "{key} = {value}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(key) || stderr(&o).contains("c.toml"),
            "{}",
            stderr(&o)
        );
    }
    let file = dir.join("g.toml");
    std::fs::write(&file, "[generation]\nrepeat_last_n = 1000000000000\n").unwrap();
    let o = run(&["serve", "--socket", socket, "--config", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("repeat_last_n must be at most 65536"),
        "{}",
        stderr(&o)
    );
    let o = run(&["run", "--repeat-last-n", "1000000000000", "hello"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("repeat_last_n"), "{}", stderr(&o));
    // In range is fine: the file's value stands, the flag's replaces it. With the model there,
    // `--check` is a full success: 0, and the line saying so.
    let model = common::default_model();
    let file = dir.join("ok.toml");
    let text = format!("model = \"{}\"\nrequest_timeout = 31536000\n", model.display());
    std::fs::write(&file, text).unwrap();
    let file = file.to_str().unwrap();
    for args in [
        &["serve", "--check", "--config", file][..],
        &["serve", "--check", "--config", file, "--request-timeout", "31536000"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("configuration valid, model {}\n", model.display()),
            "{args:?}"
        );
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

/// The context and the answer's length have ranges too (issue 23): a context of 0 or longer
/// than the model's, an answer limit past 2^20 tokens, a temperature past 100 are refused at
/// start, 2 as a flag and 78 in the file, and `serve --check` does not call such a file valid.
#[test]
fn the_context_and_the_answer_length_have_ranges() {
    let dir = common::scratch("ranges-2");
    let socket = dir.join("s.sock");
    let socket = socket.to_str().unwrap();
    let model = common::default_model();
    let model = model.to_str().unwrap();
    for args in [
        &["run", "-m", model, "--ctx-size", "0", "hi"][..],
        &["run", "-m", model, "--ctx-size", "100000", "hi"],
        &["run", "-m", model, "--max-tokens", "9223372036854775808", "hi"],
        &["run", "-m", model, "--max-tokens", "1048577", "hi"],
        &["run", "-m", model, "--temperature", "1000", "hi"],
        &["serve", "--socket", socket, "-m", model, "--ctx-size", "0"],
        &["serve", "--socket", socket, "-m", model, "--ctx-size", "100000"],
        &["serve", "--socket", socket, "-m", model, "--max-tokens", "1048577"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    // What the daemon says at start and what `--check` says (the same but for a context too
    // long for the model, which the daemon finds as it loads it).
    let too_long = "a context of 100000 tokens is longer than the model's 8192";
    for (text, check_says, serve_says) in [
        (
            "ctx_size = 0\n",
            "ctx_size must be from 16 to 1048576 tokens (and at most the model's), got 0",
            None,
        ),
        (
            "ctx_size = 100000\n",
            "ctx_size 100000 is longer than the model's context of 8192 tokens",
            Some(too_long),
        ),
        (
            "[generation]\nmax_tokens = 1048577\n",
            "max_tokens must be at most 1048576, got 1048577",
            None,
        ),
        (
            "[generation]\ntemperature = 1000.0\n",
            "temperature must be in [0, 100], got 1000",
            None,
        ),
    ] {
        let file = dir.join("c.toml");
        std::fs::write(&file, format!("model = \"{model}\"\n{text}")).unwrap();
        let o = run(&["serve", "--socket", socket, "--config", file.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(78), "{text}: {}", stderr(&o));
        let says = serve_says.unwrap_or(check_says);
        assert!(stderr(&o).contains(says), "{text}: {}", stderr(&o));
        // `--check` says an invalid configuration with 255 (its documented code), the reason,
        // and not that it is valid.
        let o = run(&["serve", "--check", "--config", file.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(255), "{text}: {}", stderr(&o));
        assert!(stderr(&o).contains(check_says), "{text}: {}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "", "{text}");
    }
}

/// A `--tokenizer` that cannot be opened is a missing input (66), as the table says; one
/// that does not parse is a bad model file (65).
#[test]
fn a_missing_tokenizer_file_exits_66() {
    let o = run(&["run", "--tokenizer", "/nonexistent/tokenizer.json", "hello"]);
    assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/tokenizer.json"), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--backend",
        "sophon",
        "--model",
        "x.bmodel",
        "--tokenizer",
        "/nonexistent/tokenizer.model",
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
    let dir = common::scratch("bad-tokenizer");
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let o = run(&["run", "--tokenizer", bad.to_str().unwrap(), "hello"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
}

/// Stop strings are bounded by their type (at most 8 of at most 256 bytes): more on the
/// command line is a usage error, not a bigger buffer.
#[test]
fn stop_strings_are_bounded() {
    let long = "x".repeat(257);
    let o = run(&["run", "--stop", &long, "hello"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("longer than 256"), "{}", stderr(&o));
    let mut args = vec!["run"];
    for _ in 0..9 {
        args.extend(["--stop", "a"]);
    }
    args.push("hello");
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("at most 8"), "{}", stderr(&o));
}
