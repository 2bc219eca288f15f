//! Removal of the temporary files that a writer killed mid-write (`kill -9`, power loss) leaves
//! behind: [`crate::io::write_atomic`] writes `<dir>/.<name>.<pid>.tmp` and renames it, so such a
//! file whose process no longer runs is garbage (up to the size of a checkpoint).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The writer's pid of a temporary file name `.<name>.<pid>.tmp` of [`crate::io::write_atomic`].
fn temp_file_pid(file_name: &str) -> Option<u32> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (name, pid) = inner.rsplit_once('.')?;
    if name.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be writing. Linux: `/proc/<pid>` exists (a reused pid counts as
/// live: the file is kept, never a live writer's file removed). Elsewhere, or without /proc: any
/// other process than this one counts as live unless the file was last modified more than an hour
/// ago (a write takes seconds).
fn writer_may_be_alive(pid: u32, path: &Path) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    if cfg!(target_os = "linux") && proc_root.join("self").exists() {
        return proc_root.join(pid.to_string()).exists();
    }
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    age.is_none_or(|a| a.as_secs() <= 3600)
}

/// Removes the stale temporary files of [`crate::io::write_atomic`] in `dir` (not its
/// subfolders): regular files named `.<name>.<pid>.tmp` whose process `pid` is not running. Returns
/// the paths removed (in name order); a missing folder has none. Files of live processes, and any
/// other file, are left alone.
pub fn remove_stale_temp_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut stale = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_file_pid) else {
            continue;
        };
        let path = entry.path();
        // not following links: only a regular file is ours
        if !entry.file_type().is_ok_and(|t| t.is_file()) || writer_may_be_alive(pid, &path) {
            continue;
        }
        stale.push(path);
    }
    stale.sort();
    for p in &stale {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::temp_file_pid;

    #[test]
    fn temp_names() {
        assert_eq!(
            temp_file_pid(".checkpoint.safetensors.1234.tmp"),
            Some(1234)
        );
        assert_eq!(temp_file_pid(".a.7.tmp"), Some(7));
        assert_eq!(temp_file_pid(".notes.tmp"), None);
        assert_eq!(temp_file_pid("checkpoint.safetensors.1234.tmp"), None);
        assert_eq!(temp_file_pid(".x.12a.tmp"), None);
        assert_eq!(temp_file_pid("..5.tmp"), None);
        assert_eq!(temp_file_pid(".x.99999999999999999999.tmp"), None);
    }
}
