//! Crash-safe file writes, private directories and permission checks.
//!
//! Every file revproxy persists goes through [`write_atomic`]: write a temporary file in the
//! same directory, fsync it, rename it over the target, fsync the directory. A crash at any
//! point leaves either the old file or the new one, never a torn mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode for private keys and state files.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode for public files (certificates).
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode for state directories that revproxy creates.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` (and its parents) with mode `0700` if it does not exist.
///
/// An existing directory's mode is left alone: the user may have chosen it on purpose, and
/// the files that matter inside it are written `0600` regardless.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Atomically replaces `path` with `contents`, created with permission bits `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // A name of its own, so that two writers of one file (two processes, or a proxy
    // renewing its certificate while a command runs) never write into each other's file.
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{seq}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    // A leftover temp file from a crashed process with our pid may carry other
    // permissions; start from nothing.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // The process umask may have cleared bits of `mode`; make the result exact.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Creates an empty file `path` readable by its owner only (it must not exist yet).
pub fn create_private_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .map(drop)
}

/// Fsyncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Checks that `dir` is safe to keep a CA in: owned by the user this process runs as, and
/// writable by nobody else (group and others could swap the files otherwise). Returns the
/// offending mode or owner.
pub fn unsafe_dir(dir: &Path) -> io::Result<Option<DirProblem>> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Ok(Some(DirProblem::Writable(mode)));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Ok(Some(DirProblem::Owner {
            owner: meta.uid(),
            me,
        }));
    }
    Ok(None)
}

/// What is wrong with a state directory (see [`unsafe_dir`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirProblem {
    /// Group or others may write to it (the mode).
    Writable(u32),
    /// Someone else owns it.
    Owner { owner: u32, me: u32 },
}

/// Checks that the file `path` is owned by the user this process runs as and that group
/// and others hold none of the permission bits in `forbidden` (`0o077` for a key: no
/// access at all; `0o022` for a file others must not be able to change, such as a pinned
/// CA certificate). Returns what is wrong.
pub fn unsafe_file(path: &Path, forbidden: u32) -> io::Result<Option<FileProblem>> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & forbidden & 0o077 != 0 {
        return Ok(Some(FileProblem::Mode(mode)));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Ok(Some(FileProblem::Owner {
            owner: meta.uid(),
            me,
        }));
    }
    Ok(None)
}

/// What is wrong with a file (see [`unsafe_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileProblem {
    /// Group or others hold forbidden permission bits (the mode).
    Mode(u32),
    /// Someone else owns it.
    Owner { owner: u32, me: u32 },
}

/// Returns the mode bits of `path` if group or others may access it, `None` if it is private.
pub fn exposed_mode(path: &Path) -> io::Result<Option<u32>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Name of the journal that [`replace_all`] writes before it starts renaming.
pub const COMMIT_FILE: &str = "replace.commit";

/// Replaces several files in `dir` as one unit: after a crash, either all old or all new
/// files are in place once [`recover`] has run (every reader of the set calls it first).
///
/// Each new file is first written durably as `NAME.new`; then a commit journal listing
/// the names is written atomically; only then are the `.new` files renamed into place.
pub fn replace_all(dir: &Path, files: &[(&str, &[u8], u32)]) -> io::Result<()> {
    recover(dir)?;
    for (name, contents, mode) in files {
        write_atomic(&dir.join(format!("{name}.new")), contents, *mode)?;
    }
    let names: Vec<&str> = files.iter().map(|(name, _, _)| *name).collect();
    write_atomic(
        &dir.join(COMMIT_FILE),
        names.join("\n").as_bytes(),
        PRIVATE_FILE_MODE,
    )?;
    recover(dir)
}

/// Finishes an interrupted [`replace_all`] in `dir`, if its journal says one was committed.
pub fn recover(dir: &Path) -> io::Result<()> {
    let journal = dir.join(COMMIT_FILE);
    let names = match fs::read_to_string(&journal) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names.lines().filter(|n| !n.is_empty() && !n.contains('/')) {
        match fs::rename(dir.join(format!("{name}.new")), dir.join(name)) {
            Ok(()) => {}
            // Already renamed before the crash.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(dir)?;
    fs::remove_file(&journal)?;
    sync_dir(dir)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(exposed_mode(&path).unwrap(), None);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file is left behind");
    }

    #[test]
    fn replace_all_swaps_a_set_and_recovery_finishes_an_interrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        replace_all(d, &[("a", b"a1", 0o600), ("b", b"b1", 0o644)]).unwrap();
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a1");
        assert_eq!(fs::read(d.join("b")).unwrap(), b"b1");

        // Simulate a crash after the journal was written and one rename happened.
        write_atomic(&d.join("a.new"), b"a2", 0o600).unwrap();
        write_atomic(&d.join("b.new"), b"b2", 0o644).unwrap();
        write_atomic(&d.join(COMMIT_FILE), b"a\nb", 0o600).unwrap();
        fs::rename(d.join("a.new"), d.join("a")).unwrap();
        recover(d).unwrap();
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a2");
        assert_eq!(fs::read(d.join("b")).unwrap(), b"b2");
        assert!(!d.join(COMMIT_FILE).exists());

        // A crash before the journal: the old set stays, the leftovers are ignored.
        write_atomic(&d.join("a.new"), b"a3", 0o600).unwrap();
        recover(d).unwrap();
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a2");
    }

    #[test]
    fn unsafe_file_reports_forbidden_bits_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        write_atomic(&path, b"x", 0o644).unwrap();
        assert_eq!(unsafe_file(&path, 0o022).unwrap(), None);
        assert_eq!(
            unsafe_file(&path, 0o077).unwrap(),
            Some(FileProblem::Mode(0o644))
        );
        write_atomic(&path, b"x", 0o664).unwrap();
        assert_eq!(
            unsafe_file(&path, 0o022).unwrap(),
            Some(FileProblem::Mode(0o664))
        );
    }

    #[test]
    fn exposed_mode_reports_group_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"x", 0o640).unwrap();
        assert_eq!(exposed_mode(&path).unwrap(), Some(0o640));
    }
}
