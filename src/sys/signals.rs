//! Signals as messages: SIGTERM and SIGINT ask the daemon to stop, SIGHUP to reload.

use std::sync::mpsc::Sender;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use signal_hook::consts::{SIGABRT, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
}

/// Starts a thread that turns signals into [`Request`]s on `to`.
///
/// # Errors
/// The handlers cannot be installed or the thread cannot start.
pub fn forward<T: From<Request> + Send + 'static>(to: Sender<T>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            let req = match sig {
                SIGHUP => Request::Reload,
                SIGINT => Request::Stop("SIGINT"),
                _ => Request::Stop("SIGTERM"),
            };
            if to.send(req.into()).is_err() {
                break;
            }
        }
    })?;
    Ok(())
}

/// Exits with `status` at once when the process aborts (SIGABRT) while `flag` is set: a
/// vendor library failing inside a call (its C++ assert unwinds to the top, where the Rust
/// runtime aborts: it cannot catch a foreign exception) ends the process with the status
/// that names an unavailable device, rather than as a crash.
///
/// # Errors
/// The handler cannot be installed.
pub fn exit_on_abort_while(flag: Arc<AtomicBool>, status: i32) -> std::io::Result<()> {
    signal_hook::flag::register_conditional_shutdown(SIGABRT, status, flag).map(|_| ())
}
