//! dispactl: the operator CLI for a Dispa plane.
//!
//! Exit codes: 0 success, 1 rejected request / invalid file / unreachable plane, 2 usage error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dispa_ctl::client::{Client, ClientError};
use dispa_ctl::output::{self, Format};
use dispa_proto::v1;

#[derive(Parser)]
#[command(
    name = "dispactl",
    version,
    about = "Operate a Dispa fleet: apply config, watch agents, roll back"
)]
struct Cli {
    /// The plane's URL.
    #[arg(
        long,
        global = true,
        env = "DISPA_PLANE",
        default_value = "http://127.0.0.1:7070"
    )]
    plane: String,
    /// A token for a plane run with --auth.
    #[arg(long, global = true, env = "DISPA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA bundle the plane's TLS certificate chains to (for an https:// plane).
    #[arg(long, global = true, env = "DISPA_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate, store and roll out a routes.toml as a new version.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the diff; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if the current version is exactly N (optimistic concurrency).
        #[arg(long, value_name = "N")]
        expect_version: Option<u64>,
        /// Why: recorded with the version.
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
    },
    /// Check a routes.toml offline, with the same code the plane runs.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show what would change: a file against the current version, or two versions.
    Diff {
        #[arg(short = 'f', long = "file", conflicts_with = "to")]
        file: Option<PathBuf>,
        /// From this version (default: the current one).
        #[arg(long)]
        from: Option<u64>,
        /// To this version.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Print a version's routes.toml (default: the current one).
    Get {
        #[arg(long)]
        version: Option<u64>,
        /// Include the content of secret files (private keys). Admin tokens only; recorded
        /// in the audit log.
        #[arg(long)]
        show_secrets: bool,
    },
    /// List versions, newest first.
    History {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Make a new version with the content of VERSION.
    Rollback {
        version: u64,
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
        #[arg(long, value_name = "N")]
        expect_version: Option<u64>,
    },
    /// List agents and what they serve.
    Agents,
    /// Query traffic logs from the whole fleet (newest first), or follow them live.
    Logs(LogsArgs),
    /// The current version and the fleet's sync state.
    Status,
    /// Create, list and revoke tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Applies, rollbacks, token changes, secret reads and denied requests, newest first.
    Audit {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it (shown once; the plane keeps only a digest).
    Create {
        /// viewer (read all but secrets), operator (apply, rollback), admin (tokens, secrets)
        /// or agent (a join token for `dispa agent --join-token`).
        #[arg(long, value_parser = ["viewer", "operator", "admin", "agent"])]
        role: String,
        /// A label shown in `token list` and the audit log.
        #[arg(long, default_value = "")]
        name: String,
    },
    List,
    /// Revoke a token by id (from `token list`).
    Revoke {
        id: String,
    },
}

#[derive(clap::Args)]
struct LogsArgs {
    /// Host (exact, case-insensitive).
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    route: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    /// A code (404) or class (5xx); repeat or comma-separate for several.
    #[arg(long)]
    status: Vec<String>,
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    path_prefix: Option<String>,
    /// Client IP address.
    #[arg(long)]
    client: Option<String>,
    /// From this long ago ("10m", "1h") or this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Until this long ago or this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// The most records to print (newest first).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// After the newest records, keep printing new ones as they arrive.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Counts by status class and latency percentiles instead of records.
    #[arg(long, conflicts_with = "follow")]
    stats: bool,
}

/// "10m" (that long ago) or an RFC 3339 time, as Unix microseconds.
fn parse_time(flag: &str, s: &str) -> Result<i64, Failure> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let usage = |m: String| Failure {
        code: 2,
        message: m,
    };
    let t = if let Ok(d) = humantime::parse_duration(s) {
        SystemTime::now().checked_sub(d).unwrap_or(UNIX_EPOCH)
    } else {
        humantime::parse_rfc3339_weak(s).map_err(|_| {
            usage(format!(
                "--{flag} {s:?}: write a duration like 10m or a time like 2026-11-26T10:00:00Z"
            ))
        })?
    };
    Ok(dispa_proto::logs::unix_us(t))
}

impl LogsArgs {
    fn query(&self) -> Result<v1::LogQuery, Failure> {
        Ok(v1::LogQuery {
            host: self.host.clone().unwrap_or_default(),
            route: self.route.clone().unwrap_or_default(),
            agent: self.agent.clone().unwrap_or_default(),
            status: self.status.clone(),
            method: self.method.clone().unwrap_or_default(),
            path_prefix: self.path_prefix.clone().unwrap_or_default(),
            client: self.client.clone().unwrap_or_default(),
            since_us: self
                .since
                .as_deref()
                .map(|s| parse_time("since", s))
                .transpose()?
                .unwrap_or(0),
            until_us: self
                .until
                .as_deref()
                .map(|s| parse_time("until", s))
                .transpose()?
                .unwrap_or(0),
            limit: self.limit,
            follow: self.follow,
        })
    }
}

/// Prints records as they arrive (a follow never ends by itself).
async fn logs(client: &mut Client, a: &LogsArgs, f: Format) -> Result<String, Failure> {
    use std::io::Write;
    let q = a.query()?;
    if a.stats {
        return Ok(output::log_stats(&client.log_stats(q).await?, f));
    }
    let mut stream = client.query_logs(q).await?;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(output::log_header(f).as_bytes());
    loop {
        match stream.message().await {
            Ok(Some(r)) => {
                if out.write_all(output::log_record(&r, f).as_bytes()).is_err() {
                    // Stdout closed (e.g. piped into head): done.
                    return Ok(String::new());
                }
                if a.follow {
                    let _ = out.flush();
                }
            }
            Ok(None) => return Ok(String::new()),
            Err(s) => return Err(ClientError::from(s).into()),
        }
    }
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let message = match &e {
            ClientError::Invalid { diagnostics, .. } => {
                format!(
                    "invalid config, nothing was stored:\n{}",
                    output::diagnostics(diagnostics).trim_end()
                )
            }
            other => other.to_string(),
        };
        Failure { code: 1, message }
    }
}

fn read_file(path: &Path) -> Result<v1::SourceFile, Failure> {
    let content = std::fs::read_to_string(path).map_err(|e| Failure {
        code: 1,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let name = path.display().to_string();
    // A file that does not parse names nothing; the plane's diagnostics will say why.
    let named = dispa_proto::config::referenced_files(&name, &content).unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut attachments = Vec::with_capacity(named.len());
    for p in named {
        let full = dir.join(&p);
        let bytes = std::fs::read(&full).map_err(|e| Failure {
            code: 1,
            message: format!("{name} names {p:?}: cannot read {}: {e}", full.display()),
        })?;
        attachments.push(v1::Attachment {
            path: p,
            content: bytes.into(),
        });
    }
    Ok(v1::SourceFile {
        name,
        content,
        attachments,
    })
}

fn author() -> String {
    let user = std::env::var("DISPA_AUTHOR")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() || user.contains('@') {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// `validate` runs offline, with the same code the plane runs.
fn validate(file: &Path, f: Format) -> Result<String, Failure> {
    let src = read_file(file)?;
    let files = dispa_proto::config::Attachments::from_wire(src.attachments);
    match dispa_proto::config::parse_with_files(&src.name, &src.content, &files) {
        Ok(c) => Ok(match f {
            Format::Json => output::pretty(
                &serde_json::json!({ "valid": true, "file": src.name, "diagnostics": [] }),
            ),
            Format::Table => format!(
                "{}: valid ({} upstreams, {} routes)\n",
                src.name,
                c.upstreams.len(),
                c.routes.len()
            ),
        }),
        Err(d) => Err(Failure {
            code: 1,
            message: d.to_string(),
        }),
    }
}

async fn run(cli: Cli) -> Result<String, Failure> {
    let f = cli.output;
    // Offline: no plane needed.
    if let Command::Validate { file } = &cli.command {
        return validate(file, f);
    }
    let plane = dispa_proto::connect::PlaneConnect {
        url: cli.plane.clone(),
        token: cli.token.clone().filter(|t| !t.is_empty()),
        ca_pem: match &cli.ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| Failure {
                code: 1,
                message: format!("--ca-file {}: {e}", p.display()),
            })?),
            None => None,
        },
        client_identity: None,
    };
    let mut client = Client::connect(&plane).await?;
    Ok(match cli.command {
        Command::Validate { file } => validate(&file, f)?,
        Command::Apply {
            file,
            dry_run,
            expect_version,
            message,
        } => {
            let r = client
                .apply(v1::ApplyRequest {
                    file: Some(read_file(&file)?),
                    dry_run,
                    expect_version,
                    message,
                    author: author(),
                })
                .await?;
            output::applied(&r, dry_run, f)
        }
        Command::Diff { file, from, to } => {
            let to = match (file, to) {
                (Some(p), _) => v1::diff_request::To::File(read_file(&p)?),
                (None, Some(v)) => v1::diff_request::To::ToVersion(v),
                (None, None) => {
                    return Err(Failure {
                        code: 2,
                        message: "diff needs -f FILE or --to VERSION".into(),
                    });
                }
            };
            let r = client
                .diff(v1::DiffRequest {
                    from_version: from.unwrap_or(0),
                    to: Some(to),
                })
                .await?;
            match f {
                Format::Json => output::pretty(
                    &serde_json::json!({ "from_version": r.from_version, "diff": r.diff }),
                ),
                Format::Table if r.diff.is_empty() => "no changes\n".into(),
                Format::Table => r.diff,
            }
        }
        Command::Get {
            version,
            show_secrets,
        } => output::get(&client.get(version.unwrap_or(0), show_secrets).await?, f),
        Command::History { limit } => output::history(&client.history(limit).await?, f),
        Command::Rollback {
            version,
            message,
            expect_version,
        } => {
            let r = client
                .rollback(v1::RollbackRequest {
                    to_version: version,
                    message,
                    author: author(),
                    expect_version,
                })
                .await?;
            match f {
                Format::Json => output::applied(&r, false, f),
                Format::Table => format!(
                    "{}rolled back: version {} has the content of version {version}\n",
                    r.diff, r.version
                ),
            }
        }
        Command::Agents => output::agents(&client.agents().await?, f),
        Command::Logs(a) => logs(&mut client, &a, f).await?,
        Command::Status => output::status(&client.status().await?, f),
        Command::Token(TokenCommand::Create { role, name }) => {
            let role = match role.as_str() {
                "viewer" => v1::Role::Viewer,
                "operator" => v1::Role::Operator,
                "admin" => v1::Role::Admin,
                _ => v1::Role::Agent,
            };
            let r = client
                .create_token(v1::CreateTokenRequest {
                    role: role as i32,
                    name,
                })
                .await?;
            output::token_created(&r, f)
        }
        Command::Token(TokenCommand::List) => output::tokens(&client.list_tokens().await?, f),
        Command::Token(TokenCommand::Revoke { id }) => {
            output::tokens(&[client.revoke_token(id).await?], f)
        }
        Command::Audit { limit } => output::audit(&client.audit(limit).await?, f),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dispactl: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("dispactl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
