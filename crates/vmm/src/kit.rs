//! Builds the guest kit (`guest/` in the repository) and finds its images.
//!
//! The kit is a cargo workspace of its own, because its programs are freestanding: the flags in
//! `guest/.cargo/config.toml` apply only to a cargo run from inside that directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the kit could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// cargo could not be started
    #[error("cannot run cargo to build the guest kit")]
    Spawn(#[source] std::io::Error),
    /// the build failed
    #[error("building the guest kit failed:\n{0}")]
    Build(String),
    /// no such guest
    #[error("the guest kit has no program {0:?} (see guest/)")]
    Unknown(String),
}

/// The repository's `guest/` directory.
pub fn dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest");
    dir.canonicalize().unwrap_or(dir)
}

/// Where the kit is built by default: `target/guest` beside the repository's own target.
pub fn target_dir() -> PathBuf {
    let dir = dir();
    dir.parent().unwrap_or(&dir).join("target/guest")
}

/// Builds the kit (release) into `target_dir` and returns the path of guest `name`.
pub fn build(name: &str, target_dir: &Path) -> Result<PathBuf, KitError> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(dir())
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(target_dir)
        // The host build's flags must not leak into freestanding guests.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .output()
        .map_err(KitError::Spawn)?;
    if !out.status.success() {
        return Err(KitError::Build(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let path = target_dir.join("release").join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(KitError::Unknown(name.into()))
    }
}
