//! The command line: `run`, `check`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "Authentication and authorization sidecar"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (without --config: plaintext 127.0.0.1:15001 -> 127.0.0.1:8080, ./policies).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate config, certificates, credentials and policies.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Decide one request offline: prints ALLOW or DENY and the determining policies.
    /// Exit 0 allow, 1 deny.
    Authorize {
        #[arg(long)]
        config: PathBuf,
        /// A Cedar principal, like `Aws::Role::"arn:aws:iam::123456789012:role/x"`.
        #[arg(long)]
        principal: String,
        #[arg(long)]
        method: String,
        /// The request path (and query), as a client would send it.
        #[arg(long)]
        path: String,
        /// `name:value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// JSON: `source_ip`, `host`, `port`, `session_name`, `presigned`.
        #[arg(long)]
        context: Option<String>,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Start an embedded upstream and the real proxy, send sample requests, print decisions.
    Demo,
    /// Sign a curl command for a warden-protected service with AWS SigV4
    /// (credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN),
    /// then run it: `warden sign -- curl https://svc:15000/api/x`.
    Sign {
        /// The signing name warden expects (its `[authn.sigv4] service`).
        #[arg(long, default_value = "vpc-lattice-svcs")]
        service: String,
        /// AWS_REGION, else us-east-1.
        #[arg(long)]
        region: Option<String>,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Exit 0 when the admin endpoint answers 200 (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:15090/readyz")]
        url: String,
    },
    /// Local-dev helpers: mint credentials for a warden-protected service.
    Token {
        #[command(subcommand)]
        kind: TokenKind,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Translate a VPC Lattice auth policy (IAM JSON) to Cedar on stdout, or
    /// refuse with the statement that cannot be translated.
    ImportLattice { file: PathBuf },
    /// Run request -> expected-decision cases against the policy directory.
    Test {
        cases: PathBuf,
        /// Whose `[authz]` and `[service]` to use (default: the embedded config, ./policies).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the policy directory (its schema.cedarschema unless the config names one).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenKind {
    /// Print an STS-backed bearer token (`k8s-aws-v1.…`) from the caller's AWS
    /// credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
    Sts {
        /// The audience warden expects (its `[authn.sts] audience`).
        #[arg(long)]
        audience: String,
        /// The region whose STS endpoint signs (AWS_REGION, else us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// The STS endpoint (default: https://sts.REGION.amazonaws.com).
        #[arg(long)]
        endpoint: Option<String>,
    },
}

/// Exit code for configuration errors (EX_CONFIG-like, as sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `workers` threads serving connections (unset: one per available core).
/// One worker is a current-thread runtime, as linkerd2-proxy runs on one
/// core: no work stealing, and a task woken by another is not handed
/// across threads.
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut b = if n <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    };
    b.enable_all().build().map_err(|e| format!("runtime: {e}"))
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    crate::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let result = Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|cfg| crate::app::load(&cfg).map(|_| ()));
            match result {
                Ok(()) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Run { config } => {
            init_logs();
            let cfg = match config {
                Some(path) => Config::load(&path),
                None => Ok(Config::embedded()),
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match runtime(cfg.runtime.workers) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let log = crate::audit::DecisionLog::stdout();
            let code = rt.block_on(run(cfg, log.clone()));
            // Outside the runtime: this may wait on the writer thread.
            log.flush();
            if code == ExitCode::SUCCESS {
                tracing::info!("stopped");
            }
            code
        }
        Command::Authorize {
            config,
            principal,
            method,
            path,
            headers,
            context,
        } => authorize(
            &config,
            &principal,
            &method,
            &path,
            &headers,
            context.as_deref(),
        ),
        Command::Policy {
            command: PolicyCommand::ImportLattice { file },
        } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => return config_error(format!("{}: {e}", file.display())),
            };
            match crate::lattice::import(&text) {
                Ok(cedar) => {
                    print!("{cedar}");
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(format!("{}: {e}", file.display())),
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Test {
                    cases,
                    config,
                    policies,
                },
        } => policy_test(&cases, config.as_deref(), policies),
        Command::Token {
            kind:
                TokenKind::Sts {
                    audience,
                    region,
                    endpoint,
                },
        } => match sts_token(&audience, region, endpoint) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Sign {
            service,
            region,
            command,
        } => sign(&service, region, &command),
        Command::Healthcheck { url } => match healthcheck(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo => {
            let rt = match runtime(Some(2)) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(crate::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn authorize(
    config: &std::path::Path,
    principal: &str,
    method: &str,
    path: &str,
    headers: &[String],
    context: Option<&str>,
) -> ExitCode {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let extra: crate::tools::Extra = match context.map(serde_json::from_str).transpose() {
        Ok(e) => e.unwrap_or_default(),
        Err(e) => return config_error(format!("--context: {e}")),
    };
    let outcome = crate::tools::load_policies(&cfg).and_then(|policies| {
        let headers = crate::tools::headers_of(headers)?;
        crate::tools::decide(&policies, &cfg, principal, method, path, &headers, &extra)
    });
    match outcome {
        Ok(d) => {
            println!("{}", if d.allow { "ALLOW" } else { "DENY" });
            let ids = if d.policies.is_empty() {
                "(none: default deny)".to_owned()
            } else {
                d.policies.join(", ")
            };
            println!("policies: {ids}");
            for e in d.errors.iter() {
                println!("error: {e}");
            }
            println!("policy set: {}", d.policy_set);
            if d.allow {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => config_error(e),
    }
}

fn policy_test(
    cases: &std::path::Path,
    config: Option<&std::path::Path>,
    policies: Option<PathBuf>,
) -> ExitCode {
    let cfg = match config
        .map(Config::load)
        .unwrap_or_else(|| Ok(Config::embedded()))
    {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let mut cfg = cfg;
    if let Some(dir) = policies {
        cfg.authz.policies = dir;
    }
    match crate::tools::run_cases(cases, &cfg) {
        Ok((lines, all)) => {
            let failed = lines.iter().filter(|l| l.starts_with("FAIL")).count();
            for line in &lines {
                println!("{line}");
            }
            println!("{} passed, {failed} failed", lines.len() - failed);
            if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => config_error(e),
    }
}

/// A plain HTTP/1.0 GET to a loopback admin URL; Ok on status 200.
fn healthcheck(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// admin URLs".to_owned());
    }
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let timeout = std::time::Duration::from_secs(3);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 32];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.0 200") || line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(line.lines().next().unwrap_or("").to_owned())
    }
}

/// AWS credentials and region from the environment, as the SDKs read them.
struct EnvCredentials {
    access_key_id: String,
    secret: String,
    session_token: Option<String>,
    region: String,
}

fn env_credentials(region: Option<String>) -> Result<EnvCredentials, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Ok(EnvCredentials {
        access_key_id: var("AWS_ACCESS_KEY_ID").ok_or("AWS_ACCESS_KEY_ID is not set")?,
        secret: var("AWS_SECRET_ACCESS_KEY").ok_or("AWS_SECRET_ACCESS_KEY is not set")?,
        session_token: var("AWS_SESSION_TOKEN"),
        region: region
            .or_else(|| var("AWS_REGION"))
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned()),
    })
}

fn sign(service: &str, region: Option<String>, command: &[String]) -> ExitCode {
    let signed = env_credentials(region).and_then(|c| {
        let key = crate::devkit::SigV4Key {
            access_key_id: &c.access_key_id,
            secret: &c.secret,
            session_token: c.session_token.as_deref(),
            region: &c.region,
            service,
        };
        crate::tools::sign_curl(command, &key, std::time::SystemTime::now())
    });
    let argv = match signed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some((program, args)) = argv.split_first() else {
        return ExitCode::from(EXIT_CONFIG);
    };
    match std::process::Command::new(program).args(args).status() {
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: `{program}`: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sts_token(
    audience: &str,
    region: Option<String>,
    endpoint: Option<String>,
) -> Result<String, String> {
    let EnvCredentials {
        access_key_id,
        secret,
        session_token,
        region,
    } = env_credentials(region)?;
    let endpoint = endpoint.unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
    let key = crate::devkit::SigV4Key {
        access_key_id: &access_key_id,
        secret: &secret,
        session_token: session_token.as_deref(),
        region: &region,
        service: "sts",
    };
    crate::devkit::sts_token(&key, &endpoint, audience, std::time::SystemTime::now())
        .map_err(|e| e.to_string())
}

async fn run(cfg: Config, log: crate::audit::DecisionLog) -> ExitCode {
    let app = match crate::app::App::bind(cfg, log.clone()).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let show = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        proxy = %show(app.proxy_addr()),
        admin = %show(app.admin_addr()),
        "warden listening"
    );
    app.run(shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
