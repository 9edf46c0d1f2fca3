//! `llama-tpu`: see `llama-tpu --help` and the README.

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    std::process::ExitCode::from(llama_tpu::cli::main())
}
