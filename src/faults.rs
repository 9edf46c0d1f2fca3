//! Fault points for the tests: places where the test build can make the daemon misbehave on
//! purpose (a slow model load, a failing device call, a stalled engine, a panicking
//! connection thread, a quicker HTTP heartbeat), each armed by an environment variable. They
//! exist only with the `fault-injection` feature, which only the test build enables
//! (Cargo.toml: the crate's dev-dependency on itself); a release or package build compiles
//! every point to nothing, so no environment can arm it there.

/// Sleeps while the model loads for `LLAMA_TPU_FAULT_LOAD_DELAY_MS` milliseconds (a 7B
/// bmodel's load, in a test).
pub fn slow_load() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = armed("LLAMA_TPU_FAULT_LOAD_DELAY_MS") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Panics the connection thread that receives the line in `LLAMA_TPU_FAULT_PANIC_LINE` (a
/// bug in a connection thread, which must not leak the connection's slot).
pub fn connection_panic(line: &[u8]) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("LLAMA_TPU_FAULT_PANIC_LINE").is_ok_and(|t| t.as_bytes() == line) {
        panic!("fault injected: LLAMA_TPU_FAULT_PANIC_LINE");
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = line;
}

/// Whether the device launch numbered `launch` (from 1) fails: launches after
/// `LLAMA_TPU_FAULT_DEVICE_AFTER` do (a device that dies mid-generation).
pub fn device_fails(launch: u64) -> bool {
    #[cfg(feature = "fault-injection")]
    if let Some(after) = armed("LLAMA_TPU_FAULT_DEVICE_AFTER") {
        return launch > after;
    }
    let _ = launch;
    false
}

/// Whether the device launch numbered `launch` (from 1) goes to the runtime unchecked with
/// its first output's memory size zero, when it is past
/// `LLAMA_TPU_FAULT_RUNTIME_ASSERT_AFTER`:
/// the vendor's runtime then asserts inside the call, as it would on a real mistake.
pub fn runtime_asserts(launch: u64) -> bool {
    #[cfg(feature = "fault-injection")]
    if let Some(after) = armed("LLAMA_TPU_FAULT_RUNTIME_ASSERT_AFTER") {
        return launch > after;
    }
    let _ = launch;
    false
}

/// Stalls the decode step numbered `step` (from 1) for `LLAMA_TPU_FAULT_STALL_MS` when it is
/// `LLAMA_TPU_FAULT_STALL_STEP` (default 3): an engine that stops making progress.
pub fn stall_decode(step: u64) {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = armed("LLAMA_TPU_FAULT_STALL_MS") {
        if step == armed("LLAMA_TPU_FAULT_STALL_STEP").unwrap_or(3) {
            // Said first, so a test can tell this stall from a slow machine's.
            log::warn!("fault injected: decode step {step} stalls for {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    let _ = step;
}

/// Slows an engine step down: one that reads prompt tokens takes
/// `LLAMA_TPU_FAULT_PROMPT_CHUNK_MS` longer (a big model's long prefill, in a test), one that
/// makes tokens `LLAMA_TPU_FAULT_TOKEN_MS` longer (a slow device, so that what a client sees
/// after a cancel can be counted in tokens rather than raced).
pub fn slow_step(reads_prompt: bool, decodes: bool) {
    #[cfg(feature = "fault-injection")]
    {
        if reads_prompt {
            if let Some(ms) = armed("LLAMA_TPU_FAULT_PROMPT_CHUNK_MS") {
                log::warn!("fault injected: a prompt chunk takes {ms} ms more");
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        if decodes {
            if let Some(ms) = armed("LLAMA_TPU_FAULT_TOKEN_MS") {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
    let _ = (reads_prompt, decodes);
}

/// The memory available for the CPU backend's slots, in bytes: `LLAMA_TPU_FAULT_MEM_AVAILABLE_MIB`
/// in a test lowers what the kernel reports (a small box), never raises it.
pub fn available_memory(reported: Option<u64>) -> Option<u64> {
    #[cfg(feature = "fault-injection")]
    if let Some(mib) = armed("LLAMA_TPU_FAULT_MEM_AVAILABLE_MIB") {
        let hooked = mib.saturating_mul(1 << 20);
        return Some(reported.map_or(hooked, |r| r.min(hooked)));
    }
    reported
}

/// The interval of an HTTP stream's comments while it waits for its first token:
/// `LLAMA_TPU_FAULT_HEARTBEAT_MS` in a test (which cannot wait the real 10 s), else `normal`.
pub fn heartbeat(normal: std::time::Duration) -> std::time::Duration {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = armed("LLAMA_TPU_FAULT_HEARTBEAT_MS") {
        return std::time::Duration::from_millis(ms);
    }
    normal
}

/// The text every answer is made of instead of what the model samples:
/// `LLAMA_TPU_FAULT_SCRIPT` in a test (a thinking model's answer from a model that does not
/// think). The engine encodes it once and forces its tokens, then an end of generation, in
/// every answer that has no shape (a JSON schema's grammar would refuse them).
pub fn script() -> Option<String> {
    #[cfg(feature = "fault-injection")]
    if let Ok(text) = std::env::var("LLAMA_TPU_FAULT_SCRIPT") {
        return Some(text);
    }
    None
}

/// Whether the fault point `name` is armed, and its number.
#[cfg(feature = "fault-injection")]
fn armed(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}
