//! The run directory: the one module that writes where a command's results go (`--out`), and
//! the one reader of `metrics.jsonl`.
//!
//! - [`RunDir::open`] checks the path before any work (a regular file or an unwritable folder
//!   fails at once, naming the flag) and takes the directory's lock: a second process writing
//!   into it is refused, naming the holder's pid; a lock left by a killed process is taken over.
//! - [`Publish`] stages a result's files as temporaries and renames them into place only when
//!   every one of them (figures included) is written, so a failing command leaves a finished
//!   result as it was, and no temporary behind.
//! - [`write_atomic`] is the one write-then-rename of a single file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::server::RoundRecord;

/// The lock file's name inside a run directory.
const LOCK: &str = ".fedbpt.lock";

/// A directory this process writes a result into, locked while it lives.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    lock: PathBuf,
}

impl RunDir {
    /// Creates `path` if needed and locks it; `flag` names where the path came from (`--out`).
    pub fn open(path: &Path, flag: &str) -> Result<RunDir> {
        if path.exists() && !path.is_dir() {
            bail!("{flag} {}: exists and is not a directory", path.display());
        }
        fs::create_dir_all(path)
            .with_context(|| format!("{flag} {}: cannot create the directory", path.display()))?;
        let lock = path.join(LOCK);
        for _ in 0..2 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).with_context(|| {
                        format!("{flag} {}: cannot write in the directory", path.display())
                    })?;
                    return Ok(RunDir { path: path.to_path_buf(), lock });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&lock).unwrap_or_default();
                    match holder.trim().parse::<u32>() {
                        Ok(pid) if pid != std::process::id() && process_alive(pid) => bail!(
                            "{flag} {}: another fedbpt process (pid {pid}) is writing there \
                             (lock {}); wait for it, or choose another directory",
                            path.display(),
                            lock.display()
                        ),
                        // Left by a process that died (or by this one): take it over.
                        _ => {
                            let _ = fs::remove_file(&lock);
                        }
                    }
                }
                Err(e) => {
                    bail!("{flag} {}: cannot write in the directory: {e}", path.display())
                }
            }
        }
        bail!("{flag} {}: could not take the lock {}", path.display(), lock.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Starts staging a result's files.
    pub fn publish(&self) -> Publish<'_> {
        Publish { dir: self, staged: Vec::new() }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Only our own lock: never one another process took over.
        let ours = fs::read_to_string(&self.lock)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours {
            let _ = fs::remove_file(&self.lock);
        }
    }
}

/// Whether `pid` is a live process (Linux: its `/proc` entry; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// A result's files, written as temporaries and renamed into place together by
/// [`Publish::commit`]; dropped uncommitted, it removes its temporaries.
pub struct Publish<'a> {
    dir: &'a RunDir,
    /// (temporary, destination)
    staged: Vec<(PathBuf, PathBuf)>,
}

impl Publish<'_> {
    /// The temporary for `name`: `stem.partial.ext`, so that writers that pick a format by the
    /// extension (the figures) still see it.
    fn temporary(&self, name: &str) -> PathBuf {
        let p = Path::new(name);
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
        match p.extension().and_then(|e| e.to_str()) {
            Some(ext) => self.dir.join(&format!("{stem}.partial.{ext}")),
            None => self.dir.join(&format!("{name}.partial")),
        }
    }

    /// Stages `bytes` as `name`.
    pub fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.temporary(name);
        self.staged.push((tmp.clone(), self.dir.join(name)));
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))
    }

    /// Stages `value` as pretty JSON in `name`.
    pub fn json(&mut self, name: &str, value: &impl serde::Serialize) -> Result<()> {
        self.bytes(name, &serde_json::to_vec_pretty(value)?)
    }

    /// Stages whatever `write` writes at the path it is given as `name` (a figure).
    pub fn file(&mut self, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = self.temporary(name);
        self.staged.push((tmp.clone(), self.dir.join(name)));
        write(&tmp)
    }

    /// Stages a file already written elsewhere in the directory (`metrics.jsonl.partial`).
    pub fn existing(&mut self, tmp: PathBuf, name: &str) {
        self.staged.push((tmp, self.dir.join(name)));
    }

    /// Renames every staged file into place (renames within a directory need no space).
    pub fn commit(mut self) -> Result<()> {
        for (tmp, dest) in std::mem::take(&mut self.staged) {
            fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        }
        Ok(())
    }
}

impl Drop for Publish<'_> {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes `bytes` beside `path`, then renames: a reader never sees half a file, and a failed
/// write leaves neither a half file nor its temporary.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written =
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display())).and_then(
            |()| fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display())),
        );
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The round records of `path` (a `metrics.jsonl`), each checked for values in range; errors
/// name the file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<RoundRecord>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let r: RoundRecord = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a round record", path.display(), i + 1))?;
            r.check().map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            Ok(r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        // A live holder: pid 1 (init) always exists.
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LOCK), "1").unwrap();
        let e = RunDir::open(&dir, "--out").unwrap_err().to_string();
        assert!(e.contains("--out") && e.contains("pid 1") && e.contains("run"), "{e}");
        // A dead holder (no such pid): taken over, and released on drop.
        fs::write(dir.join(LOCK), "4294967").unwrap();
        let d = RunDir::open(&dir, "--out").unwrap();
        assert_eq!(fs::read_to_string(dir.join(LOCK)).unwrap(), std::process::id().to_string());
        drop(d);
        assert!(!dir.join(LOCK).exists());
        // A regular file is refused by flag.
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let e = RunDir::open(&file, "--out").unwrap_err().to_string();
        assert!(e.contains("--out") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn an_uncommitted_publish_leaves_the_finished_files_and_no_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::open(tmp.path(), "--out").unwrap();
        fs::write(dir.join("summary.json"), "finished").unwrap();
        {
            let mut p = dir.publish();
            p.bytes("summary.json", b"new").unwrap();
            let failed = p.file("accuracy.png", |_| bail!("disk full"));
            assert!(failed.is_err());
        }
        assert_eq!(fs::read_to_string(dir.join("summary.json")).unwrap(), "finished");
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![LOCK.to_string(), "summary.json".to_string()]);
        let mut p = dir.publish();
        p.bytes("summary.json", b"new").unwrap();
        p.file("accuracy.png", |path| {
            assert!(path.to_string_lossy().ends_with("accuracy.partial.png"));
            Ok(fs::write(path, "png")?)
        })
        .unwrap();
        p.commit().unwrap();
        assert_eq!(fs::read_to_string(dir.join("summary.json")).unwrap(), "new");
        assert_eq!(fs::read_to_string(dir.join("accuracy.png")).unwrap(), "png");
    }
}
