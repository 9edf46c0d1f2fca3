//! Logging to stderr: with timestamps on a terminal, with syslog priority prefixes (`<3>`) and
//! no timestamps when stderr is the journal (`JOURNAL_STREAM` set by systemd), which adds its own.

use std::io::Write;

use log::{Level, LevelFilter};

/// Installs the logger. `RUST_LOG` (env_logger syntax) takes precedence over `default_level`.
pub fn init(default_level: LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(LevelFilter::Trace);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|f, record| {
            let priority = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            writeln!(f, "<{priority}>{}", record.args())
        });
    }
    // The filter above lets everything through; the global maximum does the filtering, so
    // SIGHUP can change it.
    let _ = builder.try_init();
    set_level(default_level);
}

/// Changes the level at run time (unless `RUST_LOG` fixed it).
pub fn set_level(level: LevelFilter) {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(level);
    }
}
