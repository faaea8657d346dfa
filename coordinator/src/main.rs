//! `talon-coordinator`: parses the configuration and calls
//! [`talon_coordinator::run`].

use clap::Parser;
use talon_coordinator::config::{Config, Flags, LogFormat};

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

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
    init_logs(config.log_format);
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
    match talon_coordinator::run(grpc, http, config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("talon-coordinator: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
