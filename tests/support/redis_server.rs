//! A real `redis-server` process on its own port, started and stopped by the test.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A `redis-server` with an append-only file fsynced on every write, so that a SIGKILL loses
/// nothing and a restart on the same directory comes back with the same data.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        // Ask the kernel for a free port; the tiny race with other tests is retried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if let Some(child) = spawn(port, dir.path()) {
                return RedisServer {
                    child: Some(child),
                    port,
                    dir,
                };
            }
        }
        panic!("could not start redis-server (is it installed? ./scripts/test installs it)");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: Redis disappears mid-flight, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.child = spawn(self.port, self.dir.path());
        assert!(
            self.child.is_some(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// A paused process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        super::signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        super::signal(self.pid(), "CONT");
    }

    /// A plain client, for what a test checks directly in Redis.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused (SIGSTOPped) server too.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `redis-server` and waits until it answers PING; `None` if it exited (port taken).
fn spawn(port: u16, dir: &Path) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .args(["--daemonize", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (./scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if answers_ping(port) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
