//! `llama-tpu doctor` on the BM1684X simulator: a healthy setup is all `ok`/`note` and exit
//! 0; a missing device node, too little device memory and a tokenizer of another size are
//! each a `problem` line and exit 1. A test binary of its own: the simulator's threads spin
//! while a runtime lives.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The doctor's own lines (the vendor runtime prints to the same stdout).
fn findings(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ok      ") || l.starts_with("note    ") || l.starts_with("problem "))
        .map(str::to_string)
        .collect()
}

/// Runs `doctor` on the toy with the simulator, the chip held meanwhile.
fn doctor(tokenizer: &Path, env: &[(&str, &str)], args: &[&str]) -> (Output, Vec<String>) {
    let lib = common::simulator_lib_dir();
    let toys = common::toy_models();
    let _chip = common::simulator_chip();
    let out = Command::new(env!("CARGO_BIN_EXE_llama-tpu"))
        .arg("doctor")
        .arg("--model")
        .arg(toys.join("toy_conv_f16_sample.bmodel"))
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--sophon-lib")
        .arg(&lib)
        .args(args)
        .env_remove("LLAMA_TPU_DOCTOR_FREE_MIB")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let lines = findings(&out);
    (out, lines)
}

fn toy_tokenizer() -> PathBuf {
    common::toy_models().join("tokenizer.json")
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_healthy_simulator_setup_is_all_ok_and_exits_0() {
    let (out, lines) = doctor(&toy_tokenizer(), &[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(lines.iter().all(|l| !l.starts_with("problem")), "{}", show(&out));
    for what in [
        "libsophon",
        "driver",
        "device nodes",
        "compiled by B.2.2+v1.30.2",
        "device 0 memory",
        "the bmodel loads",
        "tokenizer",
        "a run",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(what)),
            "no line about {what}:\n{}",
            show(&out)
        );
    }
    let run = lines.iter().find(|l| l.contains("a run")).unwrap();
    assert!(run.starts_with("ok"), "{run}");
    assert!(
        run.contains("time to first token") && run.contains("tokens/s") && run.contains("simulator"),
        "{run}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("ok") && l.contains("258 tokens")),
        "{}",
        show(&out)
    );
}

#[test]
fn a_missing_device_node_is_a_problem() {
    let dev = common::scratch("doctor-dev");
    let (out, lines) = doctor(
        &toy_tokenizer(),
        &[],
        &["--expect-nodes", "--dev-dir", dev.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let problems: Vec<&String> = lines.iter().filter(|l| l.starts_with("problem")).collect();
    assert_eq!(problems.len(), 1, "{}", show(&out));
    assert!(
        problems[0].contains("bm-sophon0") && problems[0].contains("bm-tpu0") && problems[0].contains("ls -l /dev/bm*"),
        "{}",
        problems[0]
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 problem"),
        "{}",
        show(&out)
    );
}

#[test]
fn a_node_the_service_user_may_not_open_is_a_problem() {
    use std::os::unix::fs::PermissionsExt;
    let dev = common::scratch("doctor-dev-mode");
    for name in ["bm-sophon0", "bmdev-ctl"] {
        let p = dev.join(name);
        std::fs::write(&p, b"").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Files of ours with mode 600: `nobody` may not open them (the memory hook ends the run
    // before the bmodel loads: only the nodes matter here).
    let (out, lines) = doctor(
        &toy_tokenizer(),
        &[("LLAMA_TPU_DOCTOR_FREE_MIB", "0")],
        &["--expect-nodes", "--dev-dir", dev.to_str().unwrap(), "--user", "nobody"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    for name in ["bm-sophon0", "bmdev-ctl"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("problem") && l.contains(name) && l.contains("nobody may not read and write")),
            "{}",
            show(&out)
        );
    }
}

#[test]
fn too_little_device_memory_is_a_problem_naming_memory_edit() {
    let (out, lines) = doctor(&toy_tokenizer(), &[("LLAMA_TPU_DOCTOR_FREE_MIB", "1")], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let memory = lines
        .iter()
        .find(|l| l.starts_with("problem") && l.contains("device 0 memory"))
        .unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(
        memory.contains("memory_edit.sh") && memory.contains("1 MiB free"),
        "{memory}"
    );
    // The bmodel is not loaded into memory it does not fit.
    assert!(!lines.iter().any(|l| l.contains("the bmodel loads")), "{}", show(&out));
}

#[test]
fn a_tokenizer_of_another_size_is_a_problem() {
    let dir = common::scratch("doctor-tokenizer");
    let text = std::fs::read_to_string(toy_tokenizer()).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    // 258 tokens (256 + 2 added) become 300.
    for i in 258..300 {
        vocab.insert(format!("extra{i}"), serde_json::Value::from(i));
    }
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let (out, lines) = doctor(&path, &[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let line = lines
        .iter()
        .find(|l| l.starts_with("problem") && l.contains("tokenizer"))
        .unwrap_or_else(|| panic!("{}", show(&out)));
    assert!(
        line.contains("300 tokens") && line.contains("lm_head 258") && line.contains("another model"),
        "{line}"
    );
}

#[test]
fn no_runtime_skips_the_rest_with_a_line_saying_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_llama-tpu"))
        .args([
            "doctor",
            "--sophon-lib",
            "/nonexistent/sophon/lib",
            "--model",
            "x.bmodel",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let lines = findings(&out);
    assert_eq!(lines.len(), 2, "{}", show(&out));
    assert!(
        lines[0].starts_with("problem libsophon: ") && lines[0].contains("--sophon-lib"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("note    skipped"), "{}", lines[1]);
}
