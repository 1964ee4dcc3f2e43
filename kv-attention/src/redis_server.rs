//! A throwaway `redis-server` for tests and tools (feature `redis`): started on 127.0.0.1
//! on a free port with its own temporary directory, no persistence, and killed (its
//! directory removed) when the guard drops. The binary is `KV_REDIS_SERVER` or
//! `redis-server` on `PATH` (`cargo xtask redis` installs Debian's).
//!
//! ```no_run
//! use kv_attention::redis_server::RedisServer;
//! let server = RedisServer::start()?;
//! let url = server.url(); // redis://127.0.0.1:PORT/
//! # Ok::<(), kv_attention::store::StoreError>(())
//! ```

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::store::StoreError;

/// A running `redis-server`, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn unavailable(reason: String) -> StoreError {
    StoreError::Unavailable {
        store: "redis-server".into(),
        reason,
    }
}

impl RedisServer {
    /// Starts a server on a free port and waits (at most 10 s) until it listens.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no port is free, the binary cannot be started or
    /// the server does not listen in time.
    pub fn start() -> Result<Self, StoreError> {
        let bin = std::env::var_os("KV_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        // A free port: bound by the system, then released for the server.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| unavailable(format!("no free port: {e}")))?
            .port();
        let dir = std::env::temp_dir().join(format!("kv-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("create {}: {e}", dir.display())))?;
        let mut server = Self {
            child: None,
            port,
            dir,
            bin,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), StoreError> {
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                unavailable(format!(
                    "cannot start {} ({e}): run `cargo xtask redis` and set KV_REDIS_SERVER",
                    self.bin.display()
                ))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() >= deadline {
                self.kill();
                return Err(unavailable(format!(
                    "redis-server did not listen on {}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (a crash, for fault tests); its port and directory stay reserved.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new server on the same port (as a restarted service would be), killing the
    /// running one first.
    ///
    /// # Errors
    /// As [`RedisServer::start`].
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
