//! The daemon serving a toy bmodel on the BM1684X simulator, end to end over its socket,
//! against the CPU reference backend's answer on the same weights. A test binary of its own:
//! the simulator's threads spin while a runtime lives, and the daemon should not compete
//! with another one in the test process.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::PathBuf;

/// Reads JSON events until `done` or `error`; returns the text and the last event.
fn answer(reader: &mut impl std::io::BufRead) -> (String, serde_json::Value) {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the daemon closed the connection"
        );
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        match event["event"].as_str() {
            Some("token") => text += event["text"].as_str().unwrap(),
            Some("done" | "error") => return (text, event),
            _ => {}
        }
    }
}

#[test]
fn the_daemon_serves_the_toy_bmodel_over_its_socket() {
    use std::io::{BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let _chip = common::simulator_chip();
    let lib = common::simulator_lib_dir();
    let toys = common::toy_models();
    let exe = env!("CARGO_BIN_EXE_llama-tpu");
    let tokenizer = toys.join("tokenizer.json");

    // What the CPU reference says, greedily, on the same weights.
    let cpu = Command::new(exe)
        .args(["run", "--threads", "1", "--temperature", "0", "-n", "12", "--model"])
        .arg(toys.join("toy_kv2.gguf"))
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("hello")
        .output()
        .unwrap();
    assert!(cpu.status.success(), "{}", String::from_utf8_lossy(&cpu.stderr));
    // `run` ends its output with a newline of its own.
    let expected = String::from_utf8(cpu.stdout)
        .unwrap()
        .strip_suffix('\n')
        .unwrap()
        .to_string();

    let dir = common::scratch("sophon-daemon");
    let socket = dir.join("llama.sock");
    let log = std::fs::File::create(dir.join("log")).unwrap();
    /// Kills the daemon if the test fails half-way (its simulator threads spin while it lives).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut daemon = Reap(
        Command::new(exe)
            .args(["serve", "--backend", "sophon", "--model"])
            .arg(toys.join("toy_conv_f16_sample.bmodel"))
            .arg("--tokenizer")
            .arg(&tokenizer)
            .arg("--sophon-lib")
            .arg(&lib)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let until = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", log());
        }
        if let Ok(s) = UnixStream::connect(&socket) {
            break s;
        }
        assert!(Instant::now() < until, "no socket:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);

    writer.write_all(b"{\"type\":\"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let status: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (status["backend"].as_str(), status["context_length"].as_u64()),
        (Some("sophon"), Some(32))
    );

    // Greedy (the on-chip greedy head): the CPU's text exactly.
    writer
        .write_all(b"{\"id\":1,\"prompt\":\"hello\",\"max_tokens\":12,\"temperature\":0}\n")
        .unwrap();
    let (text, done) = answer(&mut reader);
    assert_eq!(done["reason"], "length", "{done}");
    assert_eq!(done["completion_tokens"], 12, "{done}");
    assert_eq!(done["picker"], "greedy_head", "{done}");
    assert_eq!(text, expected);

    // Which picker ran is said: sampling the head returns runs on it; over the whole
    // vocabulary (top_k 0) on the host.
    for (top_k, picker) in [(40, "sample_head"), (0, "host")] {
        let line =
            format!("{{\"id\":9,\"prompt\":\"hello\",\"max_tokens\":2,\"temperature\":0.8,\"top_k\":{top_k}}}\n");
        writer.write_all(line.as_bytes()).unwrap();
        let (_, done) = answer(&mut reader);
        assert_eq!(done["picker"], picker, "top_k {top_k}: {done}");
    }

    // A chat (template from tokenizer_config.json) that runs into SEQLEN ends with `context`.
    writer
        .write_all(
            b"{\"id\":2,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":100,\"temperature\":0}\n",
        )
        .unwrap();
    let (_, done) = answer(&mut reader);
    assert_eq!(done["reason"], "context", "{done}");
    let used = done["prompt_tokens"].as_u64().unwrap() + done["completion_tokens"].as_u64().unwrap();
    // SEQLEN positions hold 32 tokens; the last answer token is sent, never fed back.
    assert_eq!(used, 33, "{done}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status}:\n{}", log());
}

/// A `serve --backend sophon` daemon on a toy bmodel with a fault point armed, its stdout
/// and stderr in one log, and a client connected to its socket.
struct Faulty {
    daemon: std::process::Child,
    stream: std::os::unix::net::UnixStream,
    socket: PathBuf,
    log_path: PathBuf,
}

impl Faulty {
    fn start(name: &str, bmodel: &str, fault: (&str, &str)) -> Faulty {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let toys = common::toy_models();
        let dir = common::scratch(name);
        let socket = dir.join("llama.sock");
        let log_path = dir.join("log");
        let log_file = std::fs::File::create(&log_path).unwrap();
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_llama-tpu"))
            .args(["serve", "--backend", "sophon", "--model"])
            .arg(toys.join(bmodel))
            .arg("--tokenizer")
            .arg(toys.join("tokenizer.json"))
            .arg("--sophon-lib")
            .arg(common::simulator_lib_dir())
            .arg("--socket")
            .arg(&socket)
            .env(fault.0, fault.1)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let until = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
                break s;
            }
            assert!(daemon.try_wait().unwrap().is_none(), "exited early:\n{}", log());
            assert!(Instant::now() < until, "no socket:\n{}", log());
            std::thread::sleep(Duration::from_millis(50));
        };
        Faulty {
            daemon,
            stream,
            socket,
            log_path,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to `secs` for the daemon to exit (killed and failed past that: hung).
    fn exit_status(&mut self, secs: u64) -> std::process::ExitStatus {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(s) = self.daemon.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > until {
                let _ = self.daemon.kill();
                panic!("still running after {secs} s:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// A device call that fails mid-generation (the test build's fault point fails every launch
/// after the 20th: the prompt and a few tokens in): the client gets a `device` error, the
/// daemon exits 69 for systemd to restart it, and the socket file is gone.
#[test]
fn a_device_failure_mid_generation_ends_the_daemon_with_69() {
    use std::io::{BufReader, Write};
    let _chip = common::simulator_chip();
    let mut d = Faulty::start(
        "sophon-device-failure",
        "toy_conv_f16_sample.bmodel",
        ("LLAMA_TPU_FAULT_DEVICE_AFTER", "20"),
    );
    let mut writer = d.stream.try_clone().unwrap();
    let mut reader = BufReader::new(d.stream.try_clone().unwrap());
    writer
        .write_all(b"{\"id\":1,\"prompt\":\"hello\",\"max_tokens\":20,\"temperature\":0}\n")
        .unwrap();
    let (text, end) = answer(&mut reader);
    assert_eq!(
        (end["event"].as_str(), end["code"].as_str()),
        (Some("error"), Some("device")),
        "{end}"
    );
    assert!(!text.is_empty(), "the failure came mid-generation, after some tokens");
    let status = d.exit_status(60);
    assert_eq!(status.code(), Some(69), "{status}:\n{}", d.log());
    assert!(!d.socket.exists(), "the socket file was left behind");
    assert!(d.log().contains("device failure"), "{}", d.log());
}

/// The vendor's runtime asserting inside a call (its asserts are C++ exceptions; the test
/// build's fault point hands the second launch to it with an output of no memory, which it
/// checks and throws on, as it did on a real mistake of ours): the daemon does not hang on the
/// runtime's held locks; it ends with exit 69 for systemd to restart it, the runtime's own
/// message in its output (a hang is taken as one after 2 minutes: the simulator is slow).
#[test]
fn an_assert_inside_the_vendor_runtime_ends_the_daemon_with_69() {
    use std::io::Write;
    let _chip = common::simulator_chip();
    let mut d = Faulty::start(
        "sophon-runtime-assert",
        "toy_conv_f16_dyn.bmodel",
        ("LLAMA_TPU_FAULT_RUNTIME_ASSERT_AFTER", "1"),
    );
    d.stream
        .write_all(b"{\"id\":1,\"prompt\":\"hello\",\"max_tokens\":4,\"temperature\":0}\n")
        .unwrap();
    let status = d.exit_status(120);
    let log = d.log();
    assert_eq!(status.code(), Some(69), "{status}:\n{log}");
    assert!(
        log.contains("BMRT_ASSERT"),
        "the runtime's message is in the output:\n{log}"
    );
}
