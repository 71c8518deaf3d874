//! Debian's coturn, started by a test on 127.0.0.1 with a shared secret (the TURN REST API:
//! `use-auth-secret`), and its own client, `turnutils_uclient`, to allocate a relay with given
//! credentials. `.ci/run` installs coturn and sets `TERN_TEST_COTURN`; without both the tests
//! using it say so and skip.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Coturn {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

const TURNSERVER: &str = "/usr/bin/turnserver";
const UCLIENT: &str = "/usr/bin/turnutils_uclient";

impl Coturn {
    /// A TURN server sharing `secret`, or `None` (saying why) when coturn is not installed
    /// and `TERN_TEST_COTURN` is not set; a panic when it is set and coturn is missing.
    pub fn start(secret: &str) -> Option<Coturn> {
        let installed = Path::new(TURNSERVER).exists() && Path::new(UCLIENT).exists();
        let required = std::env::var_os("TERN_TEST_COTURN").is_some();
        if !installed {
            assert!(
                !required,
                "TERN_TEST_COTURN is set but coturn is not installed (.ci/run installs it)"
            );
            eprintln!("skipped: coturn is not installed (apt-get install coturn; .ci/run does)");
            return None;
        }
        let dir = tempfile::tempdir().expect("dir");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port();
        // Relay ports of this server alone, far from the listener.
        let relay = 50_000 + (u32::from(port) * 7 % 600) as u16 * 20;
        let child = Command::new(TURNSERVER)
            .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log"])
            .args(["--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
            .arg(format!("--listening-port={port}"))
            .arg(format!("--min-port={relay}"))
            .arg(format!("--max-port={}", relay + 19))
            .args(["--use-auth-secret", "--realm=tern.test"])
            .arg(format!("--static-auth-secret={secret}"))
            // The test's peer is on loopback too.
            .arg("--allow-loopback-peers")
            .arg(format!("--db={}", dir.path().join("turndb").display()))
            .arg(format!("--pidfile={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-file={}",
                dir.path().join("turn.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnserver");
        Some(Coturn { child, port, dir })
    }

    /// Whether `turnutils_uclient` allocates a relay with these credentials and relays a
    /// few packets through it (bounded: 10 s).
    pub fn allocates(&self, username: &str, password: &str) -> bool {
        let mut client = Command::new(UCLIENT)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-u", username, "-w", password])
            // Two clients relaying to each other, 3 messages, no RTCP.
            .args(["-y", "-c", "-n", "3", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_uclient");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = client.try_wait().expect("wait") {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = client.kill();
                let _ = client.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server allocates with `username`/`password` (it is starting), at most
    /// 10 s; whether it did.
    pub fn ready_with(&self, username: &str, password: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.allocates(username, password) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The server's log, for a failing assertion.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("turn.log")).unwrap_or_default()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
