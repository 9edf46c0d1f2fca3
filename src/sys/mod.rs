//! Operating-system glue for the daemon: systemd notification and watchdog, signals, logging
//! in the journal's format, and the test build's fault points. Nothing here knows about
//! models or requests.

pub mod faults;
pub mod logging;
pub mod notify;
pub mod signals;
