//! The `gatehouse` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use gatehouse::config::{self, LoadError};
use gatehouse::server::{self, RunOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An HTTP API gateway.
#[derive(Parser, Debug)]
#[command(name = "gatehouse", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Explain, without serving, which route a request takes and why, where
    /// it goes and which policies apply. Exits 1 when no route matches.
    Route {
        /// The configuration file.
        #[arg(short = 'c', long = "conf", default_value = "conf/gatehouse.yaml")]
        conf: PathBuf,
        /// The request method, like GET.
        method: String,
        /// `http://host/path?query`, or just `/path?query`.
        url: String,
        /// A request header, `Name: value`; may be repeated.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

/// mimalloc maps its memory in large aligned regions; where the kernel's
/// transparent huge pages are `always` on, those regions fault in as 2 MiB
/// pages and the resident set more than doubles under load (measured at 1000
/// connections: 128 MiB with huge pages, 63 MiB without, same throughput).
/// Set `MIMALLOC_ALLOW_THP=1` to keep them.
///
/// It runs before `main` (a `ctor` constructor), before the Rust runtime's
/// first allocation: a huge page faulted in before the switch stays huge.
/// mimalloc's own `MIMALLOC_ALLOW_THP=0` does the same switch from its
/// initialization; this makes it the default.
#[cfg(target_os = "linux")]
#[ctor::ctor(unsafe)]
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Refused only by kernels older than 3.15; then nothing changes.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
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
    if let Some(Command::Route {
        conf,
        method,
        url,
        headers,
    }) = &cli.command
    {
        return route(conf, method, url, headers);
    }
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
            conf: cli.conf.clone(),
        },
    )
    .context("cannot start")?;
    server.run();
    Ok(ExitCode::SUCCESS)
}

/// `gatehouse route -c FILE METHOD URL [-H 'Name: value']...`
fn route(
    conf: &std::path::Path,
    method: &str,
    url: &str,
    headers: &[String],
) -> anyhow::Result<ExitCode> {
    let config = match config::load(conf) {
        Ok(c) => c,
        Err(e) => {
            report(conf, &e);
            return Ok(ExitCode::FAILURE);
        }
    };
    let method = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("\"{method}\" is not an HTTP method"))?;
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("\"{url}\" is not a URL or path"))?;
    let mut head = pingora_http::RequestHeader::build(
        method,
        uri.path_and_query()
            .map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
        None,
    )
    .context("cannot build the request")?;
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("header \"{h}\" must be written Name: value"))?;
        head.append_header(
            http::HeaderName::from_bytes(name.trim().as_bytes()).context("bad header name")?,
            http::HeaderValue::from_str(value.trim()).context("bad header value")?,
        )
        .context("bad header")?;
    }
    // The host as the proxy sees it: the URL's authority wins over `Host`.
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .map(gatehouse::forwarding::strip_port);
    // Credentials are verified for `match.claims` (not under Pingora here:
    // a runtime of its own).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let (text, matched) = runtime.block_on(gatehouse::route::explain(
        &config.runtime.router,
        &head,
        host,
        config.server.path_params,
    ));
    print!("{text}");
    Ok(if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
