//! `updraft`: see `updraft --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Both aws-lc-rs and ring end up linked (different dependencies pick different ones); choose one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = server::cli::Cli::parse();
    match server::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
