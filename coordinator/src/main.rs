//! `talon-coordinator`: parses the configuration and calls
//! [`talon_coordinator::run`].

use clap::Parser;
use talon_coordinator::config::{Config, Flags, LogFormat};

/// mimalloc, not glibc's malloc: the write path allocates and frees many
/// small buffers on several threads (gRPC frames, log entries, sled
/// nodes), and glibc's allocator took 13 % of the leader's CPU in B2.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("talon-coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if flags.check {
        match toml::to_string_pretty(&config) {
            Ok(text) => println!("# configuration is valid\n{text}"),
            Err(e) => println!("configuration is valid (cannot print it: {e})"),
        }
        return std::process::ExitCode::SUCCESS;
    }
    let json = matches!(config.log_format, LogFormat::Json);
    let settings = config
        .tracing
        .settings("talon-coordinator", json, "info,openraft=warn");
    let traces = match talon_trace::init(&settings) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("talon-coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(endpoint) = traces.endpoint() {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    let listeners = async {
        let grpc = tokio::net::TcpListener::bind(config.listen).await?;
        let http = tokio::net::TcpListener::bind(config.http_listen).await?;
        anyhow::Ok((grpc, http))
    };
    let (grpc, http) = match listeners.await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "talon-coordinator: cannot bind {} / {}: {e}",
                config.listen, config.http_listen
            );
            return std::process::ExitCode::from(1);
        }
    };
    // SIGINT or SIGTERM (what Kubernetes and systemd send): stop serving,
    // finish what is in flight, shut Raft down, exit 0.
    let shutdown = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received; stopping");
    };
    let ran = talon_coordinator::run(grpc, http, config, shutdown).await;
    traces.shutdown().await;
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("talon-coordinator: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
