//! Fault points for the tests: places where the test build can make the daemon misbehave on
//! purpose (a slow model load, and more as the tests need them), each armed by an environment
//! variable. They exist only with the `fault-injection` feature, which only the test build
//! enables (Cargo.toml: the crate's dev-dependency on itself); a release or package build
//! compiles every point to nothing, so no environment can arm it there.

/// Sleeps while the model loads for `LLAMA_TPU_FAULT_LOAD_DELAY_MS` milliseconds (a 7B
/// bmodel's load, in a test).
pub fn slow_load() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = armed("LLAMA_TPU_FAULT_LOAD_DELAY_MS") {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Whether the fault point `name` is armed, and its number.
#[cfg(feature = "fault-injection")]
fn armed(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}
