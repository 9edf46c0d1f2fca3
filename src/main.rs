//! `llama-tpu`: see `llama-tpu --help` and the README.

fn main() -> std::process::ExitCode {
    // Warnings only for the one-shot commands; `serve` raises it to its configured level.
    llama_tpu::sys::logging::init(log::LevelFilter::Warn);
    std::process::ExitCode::from(llama_tpu::cli::main())
}
