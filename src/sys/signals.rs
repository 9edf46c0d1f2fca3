//! Signals as messages: SIGTERM and SIGINT ask the daemon to stop, SIGHUP to reload.

use std::sync::mpsc::Sender;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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
