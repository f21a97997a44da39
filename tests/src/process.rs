//! Spawning and stopping the real binaries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

/// target/debug (or DISPA_BIN_DIR), where `dispa` and `dispactl` are.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("DISPA_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/debug/deps/<test binary> -> target/debug
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins) or set DISPA_BIN_DIR",
        p.display()
    );
    p
}

async fn read_ready(file: &Path, child: &mut Child, log: &Path) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "process exited early ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Some(v) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ready file {} after 20s",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addr(v: &Value, key: &str) -> SocketAddr {
    v[key]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in ready file: {v}"))
}

fn spawn(args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(bin("dispa"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dispa")
}

async fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .await;
    }
}

/// A running `dispa plane`.
pub struct PlaneProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl PlaneProc {
    pub async fn start(dir: &Path) -> PlaneProc {
        Self::start_at(dir, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to restart a plane where its agents expect it).
    pub async fn start_at(dir: &Path, listen: SocketAddr) -> PlaneProc {
        Self::start_with(dir, listen, &[]).await
    }

    /// Starts with extra flags, e.g. `--log-store postgres://...`.
    pub async fn start_with(dir: &Path, listen: SocketAddr, extra: &[&str]) -> PlaneProc {
        let data_dir = dir.join("plane-data");
        let ready = dir.join("plane.ready");
        let _ = std::fs::remove_file(&ready);
        let log = dir.join("plane.log");
        let args = vec![
            "plane".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
        ];
        let args: Vec<String> = args
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect();
        let mut child = spawn(&args, &log);
        let v = read_ready(&ready, &mut child, &log).await;
        PlaneProc {
            child,
            addr: addr(&v, "plane"),
            data_dir,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running `dispa agent`.
pub struct AgentProc {
    pub child: Child,
    pub id: String,
    pub proxy: SocketAddr,
    /// The TLS proxy listener, when started with `--listen-tls`.
    pub proxy_tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl AgentProc {
    /// The agent's /metrics text; None if the scrape fails.
    pub async fn metrics_text(&self) -> Option<String> {
        let reply = crate::http_client::HttpClient::new()
            .get(&format!("http://{}/metrics", self.admin), None)
            .await
            .ok()?;
        Some(reply.text())
    }

    /// Starts an agent with its cache in `dir/<id>-cache`.
    pub async fn start(dir: &Path, plane_url: &str, id: &str) -> AgentProc {
        Self::start_with(dir, plane_url, id, &[]).await
    }

    pub async fn start_with(dir: &Path, plane_url: &str, id: &str, extra: &[&str]) -> AgentProc {
        let ready = dir.join(format!("{id}.ready"));
        let _ = std::fs::remove_file(&ready);
        let log = dir.join(format!("{id}.log"));
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--plane".into(),
            plane_url.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--id".into(),
            id.into(),
            "--cache-dir".into(),
            dir.join(format!("{id}-cache")).display().to_string(),
            "--ready-file".into(),
            ready.display().to_string(),
            "--label".into(),
            "suite=e2e".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = spawn(&args, &log);
        let v = read_ready(&ready, &mut child, &log).await;
        AgentProc {
            child,
            id: id.into(),
            proxy: addr(&v, "proxy"),
            proxy_tls: v["proxy_tls"].as_str().and_then(|s| s.parse().ok()),
            admin: addr(&v, "admin"),
            log,
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Starts an agent that also listens for TLS on a free port (`--listen-tls`).
    pub async fn start_tls(dir: &Path, plane_url: &str, id: &str) -> AgentProc {
        let a = Self::start_with(dir, plane_url, id, &["--listen-tls", "127.0.0.1:0"]).await;
        assert!(a.proxy_tls.is_some(), "no proxy_tls in the ready file");
        a
    }

    pub async fn sigterm(&self) {
        signal(&self.child, "-TERM").await;
    }

    /// Waits for the agent to exit, up to `within`, and asserts it exited with status 0.
    pub async fn exits_cleanly(&mut self, within: Duration) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("agent exits")
            .expect("agent's exit status");
        assert_eq!(status.code(), Some(0), "log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The version the agent's admin /config says it serves.
    pub async fn served_version(&self, http: &crate::HttpClient) -> Option<u64> {
        let r = http
            .get(&format!("http://{}/config", self.admin), None)
            .await
            .ok()?;
        let v: Value = serde_json::from_slice(&r.body).ok()?;
        v["version"].as_u64()
    }
}

/// What a `dispactl` run printed and how it exited.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "dispactl failed: {self:?}");
        self
    }
}

/// Runs `dispactl --plane URL ARGS...`.
pub async fn ctl(plane_url: &str, args: &[&str]) -> CtlOutput {
    let out = Command::new(bin("dispactl"))
        .arg("--plane")
        .arg(plane_url)
        .args(args)
        .env("DISPA_AUTHOR", "e2e")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run dispactl");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A process's resident set size in KiB (Linux /proc), if readable.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// A KiB field of /proc/PID/status ("VmRSS:", "VmHWM:" for the peak), if readable.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The value of the first sample in Prometheus `text` whose line starts with `line_prefix`
/// (name and labels, e.g. `dispa_retries_total `).
pub fn metric_value(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
