//! Operating-system glue for the daemon: systemd notification and watchdog, signals, logging
//! in the journal's format, the heap's setup. Nothing here knows about models or requests.

pub mod logging;
pub mod memory;
pub mod notify;
pub mod signals;
