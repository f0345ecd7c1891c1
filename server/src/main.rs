//! `updraft`: see `updraft --help`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Both aws-lc-rs and ring end up linked (different dependencies pick different ones); choose one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = server::cli::Cli::parse();
    // The blocking pool serves package file reads (and object_store's file work). A thousand concurrent
    // downloads must not become a thousand threads: 64 keep the disk busy and memory flat.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("updraft: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
