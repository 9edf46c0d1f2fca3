//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The embedded default model. Tests that need it fail (never skip) when it is absent.
pub fn default_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(llama_tpu::cli::DEFAULT_MODEL);
    assert!(
        p.exists(),
        "{} is missing: run `make model` first (the README's test command does)",
        p.display()
    );
    p
}

/// The binary `exe`, started through `$LLAMA_TPU_TEST_RUNNER` when set (`make cross-test`
/// sets it to qemu: an aarch64 binary cannot be started directly on the x86_64 build machine).
pub fn bin(exe: &str) -> Command {
    match std::env::var("LLAMA_TPU_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut c = Command::new(parts.next().unwrap_or_default());
            c.args(parts).arg(exe);
            c
        }
        _ => Command::new(exe),
    }
}

/// A fresh scratch directory under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Runs the numpy reference generator into `dir` (toy GGUFs + expected logits) with
/// `$LLAMA_TPU_PYTHON` (set by `make test` to its venv) or `python3`. Fails loudly when Python,
/// numpy or gguf are missing.
pub fn numpy_reference(dir: &Path) {
    let dir = dir.display().to_string();
    run_reference("llama_reference.py", &[&dir]);
}

/// Reads little-endian f32s.
pub fn read_f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("read logits")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Runs a `sim/` script once per test process (the scripts also lock against other
/// processes) and returns the folder it prints. Fails loudly, with the script's reason.
fn sim_folder_once(cell: &std::sync::Mutex<Option<PathBuf>>, script: &str, what: &str) -> PathBuf {
    let mut done = cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(dir) = done.as_ref() {
        return dir.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(script))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{what}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = root.join(String::from_utf8_lossy(&out.stdout).trim());
    *done = Some(dir.clone());
    dir
}

/// The BM1684X simulator's runtime libraries (tpu-mlir wheel's libbmrt, libbmlib, libcmodel),
/// installed on first use by `sim/install.sh` into `.cache/tpu-mlir`. Fails loudly, with the
/// reason, when they cannot be had: these tests never skip.
pub fn simulator_lib_dir() -> PathBuf {
    static INSTALLED: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    sim_folder_once(
        &INSTALLED,
        "sim/install.sh",
        "the BM1684X simulator could not be installed",
    )
}

/// The toy Llama models compiled for the BM1684X by the vendor's compiler, with the same
/// weights as GGUF (`sim/toy.sh`, built once per generator version into `.cache/toy`; it
/// installs the simulator first). Fails loudly, with the reason, when they cannot be built:
/// these tests never skip.
pub fn toy_models() -> PathBuf {
    static BUILT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    sim_folder_once(&BUILT, "sim/toy.sh", "the toy bmodels could not be built")
}

/// The simulated chip, held by a test while its backend lives: the simulator models one chip
/// per process, and two runtimes driving it from parallel tests disturb each other. A test
/// that holds it past a limit is hung (in the vendor's runtime, or in a
/// daemon it waits for): the whole test process ends then, with the test named, rather than
/// CI waiting for its own limit. (See [`simulator_test_limit`].)
pub fn simulator_chip() -> Chip {
    static CHIP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = CHIP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watched = std::sync::Arc::clone(&held);
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let limit = simulator_test_limit();
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while watched.load(std::sync::atomic::Ordering::Relaxed) {
            if start.elapsed() > limit {
                eprintln!(
                    "{test} has held the simulated chip for {} s: hung; ending the test process",
                    limit.as_secs()
                );
                std::process::exit(124);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    Chip { _guard: guard, held }
}

/// Longest a test may hold the simulated chip: the slowest of `make test` takes about 2
/// minutes; `make sim-real`'s take several times that and set `LLAMA_TPU_SIM_TEST_LIMIT_S`.
fn simulator_test_limit() -> std::time::Duration {
    let secs = std::env::var("LLAMA_TPU_SIM_TEST_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    std::time::Duration::from_secs(secs)
}

/// See [`simulator_chip`].
pub struct Chip {
    _guard: std::sync::MutexGuard<'static, ()>,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Chip {
    fn drop(&mut self) {
        self.held.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A free loopback TCP port (bound and released: good for a test that binds it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// A `serve` daemon with the HTTP front on a free loopback port, on the default model
/// (greedy, one thread, debug log); killed when dropped.
pub struct HttpDaemon {
    /// The process.
    pub child: std::process::Child,
    /// The HTTP port.
    pub port: u16,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for HttpDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HttpDaemon {
    /// Starts one with more `serve` arguments and waits until `/health` says it serves.
    pub fn start(name: &str, args: &[&str]) -> HttpDaemon {
        HttpDaemon::start_with(name, &[], args)
    }

    /// The same with environment variables (the test build's fault points).
    pub fn start_with(name: &str, env: &[(&str, &str)], args: &[&str]) -> HttpDaemon {
        let d = HttpDaemon::spawn(name, env, args);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while http_health(d.port).0 != 200 {
            assert!(std::time::Instant::now() < until, "the daemon never became healthy");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    /// Starts one and returns once its HTTP port accepts connections (the model may still
    /// be loading).
    pub fn spawn(name: &str, env: &[(&str, &str)], args: &[&str]) -> HttpDaemon {
        let dir = scratch(name);
        let port = free_port();
        let child = bin(env!("CARGO_BIN_EXE_llama-tpu"))
            .args([
                "serve",
                "--temperature",
                "0",
                "--log-level",
                "debug",
                "--threads",
                "1",
                "--model",
            ])
            .arg(default_model())
            .arg("--socket")
            .arg(dir.join("s.sock"))
            .args(["--http", &format!("127.0.0.1:{port}")])
            // Tests of the queue (a stream waiting for another) need one request at a time;
            // tests of slots say how many.
            .args(if args.contains(&"--slots") {
                &[][..]
            } else {
                &["--slots", "1"][..]
            })
            .args(args)
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .stdin(std::process::Stdio::null())
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < until, "the HTTP port never opened");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        HttpDaemon {
            child,
            port,
            log: dir.join("log"),
        }
    }

    /// The OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

/// `/health`'s status and body on a loopback port; 0 when the port does not answer yet.
pub fn http_health(port: u16) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    let mut all = String::new();
    if s.read_to_string(&mut all).is_err() || all.len() < 12 {
        return (0, String::new());
    }
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (all[9..12].parse().unwrap_or(0), body)
}

/// Runs a script of `tests/reference` with the test venv's Python (`$LLAMA_TPU_PYTHON`, set
/// by `make test`) and returns what it printed; fails with its stderr.
fn run_reference(name: &str, args: &[&str]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(name);
    let python = std::env::var("LLAMA_TPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (`make test` sets up .cache/venv)"));
    assert!(
        out.status.success(),
        "{name} failed (its packages come with `make venv`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The same, for a script that prints JSON.
pub fn reference_script(name: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&run_reference(name, args)).unwrap_or_else(|e| panic!("{name} printed no JSON: {e}"))
}
