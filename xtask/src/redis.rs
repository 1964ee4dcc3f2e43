//! `cargo xtask redis`: a real `redis-server` for the Redis tier's tests, from Debian's
//! packages, installed without root into `~/.cache/kv/redis/<version>`.
//!
//! `apt-get download` fetches the pinned packages (redis-server, redis-tools and the two
//! libraries the server links that a minimal system lacks), each is checked against the
//! SHA-256 recorded here, and `dpkg -x` unpacks them; nothing is installed system-wide. A
//! small wrapper script sets the library path. A `redis-server` already on `PATH` (or
//! `KV_REDIS_SERVER`) is used as it is.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The packages, their pinned versions (Debian 12's redis 7.0) and their SHA-256.
const DEBS: [(&str, &str, &str); 4] = [
    (
        "redis-server",
        "5:7.0.15-1~deb12u7",
        "1f43e46f153d1653586e72871dd3e2ea08acba5c3d2b38b02f90d63d16352cac",
    ),
    (
        "redis-tools",
        "5:7.0.15-1~deb12u7",
        "3c8cd27847c6a06b6f6c29e7415a9057462a89661e3a8e2eb8dd5b2d7830bb40",
    ),
    (
        "liblzf1",
        "3.6-3",
        "9854b0866201b63e04f1e446f45f01ef4a6f72c61f2250b75f944f6046cc7e8c",
    ),
    (
        "libjemalloc2",
        "5.3.0-1",
        "a4117c23c5c8acf6c9678a6cb086f000b79476369da7efe8a78a70826956ad3d",
    ),
];

/// The directory name of this pinned set.
const TAG: &str = "7.0.15-1-deb12u7";

fn works(server: &Path) -> bool {
    Command::new(server)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("v="))
}

/// The `redis-server` to run: `KV_REDIS_SERVER`, one on `PATH`, or the pinned Debian
/// packages unpacked under `~/.cache/kv/redis` (downloaded the first time).
pub(crate) fn ensure_redis() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KV_REDIS_SERVER") {
        let p = PathBuf::from(p);
        return if works(&p) {
            Ok(p)
        } else {
            Err(format!("KV_REDIS_SERVER={} does not run", p.display()))
        };
    }
    for name in ["redis-server", "valkey-server"] {
        if works(Path::new(name)) {
            return Ok(PathBuf::from(name));
        }
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let dir = PathBuf::from(home).join(".cache/kv/redis").join(TAG);
    let wrapper = dir.join("redis-server");
    if works(&wrapper) {
        return Ok(wrapper);
    }
    if std::env::consts::ARCH != "x86_64" {
        return Err(format!(
            "the pinned redis packages are amd64; install redis-server on this {} machine or \
             set KV_REDIS_SERVER",
            std::env::consts::ARCH
        ));
    }
    let download = dir.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).map_err(|e| format!("{}: {e}", download.display()))?;
    let root = dir.join("root");
    fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    for (package, version, sha) in DEBS {
        println!("redis: apt-get download {package}={version}");
        let status = Command::new("apt-get")
            .args(["download", &format!("{package}={version}")])
            .current_dir(&download)
            .status()
            .map_err(|e| format!("apt-get download {package}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "apt-get download {package}={version} failed ({status}); run `apt-get update` \
                 or install redis-server and set KV_REDIS_SERVER"
            ));
        }
        let deb = fs::read_dir(&download)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .ok_or_else(|| format!("apt-get download left no {package} package"))?;
        let got = crate::fetch::file_sha256(&deb)?;
        if got != sha {
            return Err(format!(
                "{} has SHA-256 {got}, expected {sha}: refusing it",
                deb.display()
            ));
        }
        let status = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()
            .map_err(|e| format!("dpkg -x {}: {e}", deb.display()))?;
        if !status.success() {
            return Err(format!("dpkg -x {} failed ({status})", deb.display()));
        }
    }
    let script = format!(
        "#!/bin/sh\n# redis-server from Debian's packages, unpacked by cargo xtask redis.\n\
         LD_LIBRARY_PATH='{lib}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} exec '{bin}' \"$@\"\n",
        lib = root.join("usr/lib/x86_64-linux-gnu").display(),
        bin = root.join("usr/bin/redis-server").display(),
    );
    fs::write(&wrapper, script).map_err(|e| format!("{}: {e}", wrapper.display()))?;
    let chmod = Command::new("chmod").arg("755").arg(&wrapper).status();
    if !chmod.is_ok_and(|s| s.success()) {
        return Err(format!("cannot make {} executable", wrapper.display()));
    }
    let _ = fs::remove_dir_all(&download);
    if works(&wrapper) {
        Ok(wrapper)
    } else {
        Err(format!(
            "{} does not run after unpacking",
            wrapper.display()
        ))
    }
}
