//! The `pixtract` binary: the command line (`cli`, the only place clap lives) and the benchmarks (`bench`),
//! over the library's stages.

mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIXTRACT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::main()
}
