//! The server under test: either a `ternd` this tool starts (a throwaway data directory, and with
//! `--postgres URL` a throwaway schema in that database, dropped afterwards with `psql`; the
//! process optionally pinned to CPUs with `taskset`) or one already running (`--server`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub struct Target {
    pub url: String,
    pub addr: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    /// (URL, schema) of the throwaway PostgreSQL schema, dropped with the target.
    schema: Option<(String, String)>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Use a running server (http://host:port) instead of starting one. Memory is then not
    /// measured unless --server-pid is given.
    #[arg(long)]
    pub server: Option<String>,
    /// The running server's process id, for memory figures with --server.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The ternd binary to start (default: next to this binary).
    #[arg(long)]
    pub ternd: Option<PathBuf>,
    /// Pin the started ternd to these CPUs (taskset -c LIST), e.g. "1".
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Extra `--set KEY=VALUE` settings for the started ternd.
    #[arg(long = "server-set", value_name = "KEY=VALUE")]
    pub server_set: Vec<String>,
    /// Start ternd on PostgreSQL at this URL, in a throwaway schema (dropped afterwards with
    /// `psql`, which must be installed).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
}

/// `host:port` of a server URL `http://host:port`.
pub fn address_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

impl Target {
    pub fn start(args: &TargetArgs) -> anyhow::Result<Target> {
        if let Some(url) = &args.server {
            let addr = address_of(url);
            return Ok(Target {
                url: url.clone(),
                addr,
                child: None,
                _dir: None,
                schema: None,
            });
        }
        let ternd = match &args.ternd {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("ternd"),
        };
        if !ternd.exists() {
            bail!(
                "{} not found: build it (cargo build --release -p tern-server) or pass --ternd",
                ternd.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let schema = args.postgres.as_ref().map(|url| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (
                url.clone(),
                format!("bench_{:x}_{}", nanos, std::process::id()),
            )
        });
        let mut cmd = match &args.server_cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(&ternd);
                c
            }
            None => Command::new(&ternd),
        };
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path());
        // Account creation is set-up, not what is measured: keep argon2 cheap. Every load
        // comes from 127.0.0.1, so the per-address and per-device limits are raised out of
        // the way — raised, not turned off, so that their checks are part of what is measured.
        for kv in [
            "password_hashing.memory_kib=64",
            "password_hashing.iterations=1",
            "password_hashing.max_waiting=1000000",
            "rate_limits.registrations_per_hour_per_address=100000000",
            "rate_limits.logins_per_minute_per_address=100000000",
            "rate_limits.logins_per_minute_per_user_and_address=1000",
            "rate_limits.sends_per_second=100000000",
            "rate_limits.send_burst=100000000",
            "connections.max_per_address=100000000",
            // The `push` scenario's push service is on 127.0.0.1, over http.
            "push.allow_insecure_loopback=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(schema.iter().flat_map(|(url, name)| {
            [
                "storage.backend=postgres".to_owned(),
                format!("storage.postgres.url={url}"),
                format!("storage.postgres.schema={name}"),
            ]
        }))
        .chain(args.server_set.iter().cloned())
        {
            cmd.args(["--set", &kv]);
        }
        let mut child = cmd
            .env("TERN_LOG", "warn,tern_server::app=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", ternd.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !told && let Some(rest) = line.split("addr=").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                    told = true;
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("ternd: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .context("ternd did not report its address")?;
        Ok(Target {
            url: format!("http://{addr}"),
            addr,
            child: Some(child),
            _dir: Some(dir),
            schema,
        })
    }

    pub fn pid(&self, args: &TargetArgs) -> Option<u32> {
        self.child
            .as_ref()
            .map(|c| {
                // With taskset, the child execs ternd in place: same pid.
                c.id()
            })
            .or(args.server_pid)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        if let Some((url, name)) = &self.schema {
            let dropped = Command::new("psql")
                .args([
                    url.as_str(),
                    "-qAtc",
                    &format!(
                        "SET client_min_messages = warning; DROP SCHEMA IF EXISTS {name} CASCADE"
                    ),
                ])
                .status();
            if !dropped.is_ok_and(|s| s.success()) {
                eprintln!("could not drop the PostgreSQL schema {name}: drop it by hand");
            }
        }
    }
}

/// Resident memory of a process in bytes (VmRSS), and its peak (VmHWM).
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) the process has used so far, from /proc (Linux; clock ticks of
/// 1/100 s, USER_HZ on every common configuration).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}
