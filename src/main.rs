//! The `gatehouse` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use gatehouse::config::{self, LoadError};
use gatehouse::server::{self, RunOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An HTTP API gateway.
#[derive(Parser, Debug)]
#[command(name = "gatehouse", version, about)]
struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long = "conf", default_value = "conf/gatehouse.yaml")]
    conf: PathBuf,
    /// Load and fully validate the configuration, print `config OK` or every
    /// error, and exit. Binds nothing.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Take the listening sockets over from the running instance.
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    /// Run in the background (systemd Type=forking).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatehouse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let loaded = config::load(&cli.conf);
    if cli.test {
        return Ok(match loaded {
            Ok(_) => {
                println!("config OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&cli.conf, &e);
                ExitCode::FAILURE
            }
        });
    }
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            report(&cli.conf, &e);
            return Ok(ExitCode::FAILURE);
        }
    };
    let server = server::build(
        config,
        &RunOptions {
            upgrade: cli.upgrade,
            daemon: cli.daemon,
        },
    )
    .context("cannot start")?;
    server.run_forever();
}

fn report(path: &std::path::Path, e: &LoadError) {
    match e {
        LoadError::Read { .. } => eprintln!("{}: {e}", path.display()),
        LoadError::Invalid(errors) => {
            for error in errors.iter() {
                eprintln!("{}: error: {error}", path.display());
            }
            eprintln!(
                "{}: {} error{} found",
                path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
        }
    }
}
