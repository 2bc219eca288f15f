//! Many images across many machines: `segment --shard i/n` takes every n-th input starting at the
//! i-th (of the list every shard sees the same way: folders expanded and sorted, files as given),
//! `--skip-existing` leaves inputs whose outputs are all there, and a JSON-lines manifest records
//! each input's outcome (outputs, SHA-256 of the input, timing, status, error).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// `i/n` with 0 ≤ i < n.
pub fn parse_shard(s: &str) -> Result<Shard, String> {
    let bad = || format!("{s:?}: a shard i/n with 0 <= i < n (e.g. 0/4)");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let index: usize = i.trim().parse().map_err(|_| bad())?;
    let count: usize = n.trim().parse().map_err(|_| bad())?;
    if count == 0 || index >= count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

impl Shard {
    /// Whether the `k`-th input of the whole list belongs to this shard (round robin, so that
    /// shards get similar mixes of a folder sorted by name).
    pub fn takes(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    /// The manifest's file name: `manifest.jsonl`, or one per shard so that shards writing to
    /// the same (network) folder never append to the same file.
    pub fn manifest_name(shard: Option<Shard>) -> String {
        match shard {
            None => "manifest.jsonl".into(),
            Some(s) => format!("manifest.shard-{}-of-{}.jsonl", s.index, s.count),
        }
    }
}

/// SHA-256 of a file, read in pieces.
pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// One input's outcome.
pub enum Outcome<'a> {
    Done,
    Skipped,
    Failed(&'a str),
}

/// The manifest: one JSON object per line, appended as each input finishes (a rerun appends
/// more lines; the last line of an input is its latest outcome).
pub struct Manifest {
    path: PathBuf,
    file: std::fs::File,
    shard: Option<Shard>,
}

impl Manifest {
    pub fn open(out: &Path, shard: Option<Shard>) -> anyhow::Result<Manifest> {
        let path = out.join(Shard::manifest_name(shard));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Manifest { path, file, shard })
    }

    /// Appends the line of `input`; `outputs` are the files it wrote (or found, when skipped).
    pub fn record(
        &mut self,
        input: &Path,
        outputs: &[PathBuf],
        outcome: Outcome,
        seconds: f64,
    ) -> anyhow::Result<()> {
        let sha = sha256_file(input).ok();
        let (status, error) = match outcome {
            Outcome::Done => ("ok", None),
            Outcome::Skipped => ("skipped", None),
            Outcome::Failed(e) => ("error", Some(e)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let line = serde_json::json!({
            "input": input.display().to_string(),
            "sha256": sha,
            "status": status,
            "error": error,
            "outputs": outputs
                .iter()
                .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
                .collect::<Vec<_>>(),
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "shard": self.shard.map(|s| format!("{}/{}", s.index, s.count)),
            "finished_unix": now,
        });
        // One write per line: appends of whole lines do not interleave.
        let mut text = serde_json::to_string(&line)?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))
    }
}

/// [`Manifest::record`] when a manifest is kept.
pub fn record(
    m: &mut Option<Manifest>,
    input: &Path,
    outputs: &[PathBuf],
    outcome: Outcome,
    seconds: f64,
) -> anyhow::Result<()> {
    match m {
        Some(m) => m.record(input, outputs, outcome, seconds),
        None => Ok(()),
    }
}

/// Records how one input ended: its outputs when `res` is a success, its error otherwise.
pub fn record_result<T>(
    m: &mut Option<Manifest>,
    input: &Path,
    outputs: &[PathBuf],
    res: &anyhow::Result<T>,
    seconds: f64,
) -> anyhow::Result<()> {
    match res {
        Ok(_) => record(m, input, outputs, Outcome::Done, seconds),
        Err(e) => record(m, input, &[], Outcome::Failed(&format!("{e:#}")), seconds),
    }
}

/// With `skip`, and every file of `outputs` there: records the input as skipped and says so.
pub fn skip_if_done(
    m: &mut Option<Manifest>,
    skip: bool,
    input: &Path,
    outputs: &[PathBuf],
) -> anyhow::Result<bool> {
    if !(skip && all_exist(outputs)) {
        return Ok(false);
    }
    record(m, input, outputs, Outcome::Skipped, 0.0)?;
    Ok(true)
}

/// Whether every file of `outputs` exists (they are written under temporary names and renamed
/// into place together, so existing ones are complete).
pub fn all_exist(outputs: &[PathBuf]) -> bool {
    !outputs.is_empty() && outputs.iter().all(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_inputs() {
        for n in 1..6 {
            let shards: Vec<Shard> = (0..n)
                .map(|i| parse_shard(&format!("{i}/{n}")).unwrap())
                .collect();
            for k in 0..40 {
                assert_eq!(shards.iter().filter(|s| s.takes(k)).count(), 1);
            }
        }
        for bad in ["1/1", "2/1", "0/0", "a/2", "1", "-1/2", "1/2/3"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }
}
