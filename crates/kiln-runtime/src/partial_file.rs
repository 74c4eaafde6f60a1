//! Files that appear whole or not at all: written as `NAME.partial` and renamed to
//! `NAME` once complete, so a reader never sees half a file and a failed write leaves
//! nothing behind. The profiler's report and trace and the CLI's outputs use it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written under its `.partial` name; [`commit`](Self::commit) gives it
/// its own name, and dropping it uncommitted removes it.
pub struct PartialFile {
    path: PathBuf,
    partial: PathBuf,
    out: Option<BufWriter<File>>,
}

impl PartialFile {
    /// Creates `path` + `.partial` for writing (the folder must exist).
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let out = BufWriter::new(File::create(&partial)?);
        Ok(PartialFile { path: path.to_path_buf(), partial, out: Some(out) })
    }

    /// The name it is written under until committed.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Where the bytes go.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.out.as_mut().expect("a PartialFile holds its writer until commit or drop")
    }

    /// Flushes, closes and renames it to its own name.
    pub fn commit(mut self) -> io::Result<()> {
        let mut out = self.out.take().expect("a PartialFile holds its writer until commit or drop");
        out.flush()?;
        // Closed before the rename, which some systems refuse on an open file.
        drop(out);
        std::fs::rename(&self.partial, &self.path)?;
        self.partial = PathBuf::new();
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        // Not committed (or the commit failed): close, then remove what was written.
        self.out.take();
        if !self.partial.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Writes `path` whole through a [`PartialFile`], creating its folder first: readers
/// see all of it or nothing. The profiler's report and trace are written this way.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> kiln_core::Result<()> {
    let result = (|| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = PartialFile::create(path)?;
        write(file.writer())?;
        file.commit()
    })();
    result.map_err(|e| kiln_core::Error::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_committed_file_takes_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut file = PartialFile::create(&path).unwrap();
        file.writer().write_all(b"one\n").unwrap();
        assert!(file.partial_path().is_file() && !path.exists());
        file.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        assert!(!dir.path().join("out.jsonl.partial").exists());

        let other = dir.path().join("failed.jsonl");
        let mut file = PartialFile::create(&other).unwrap();
        file.writer().write_all(b"half").unwrap();
        drop(file);
        assert!(!other.exists() && !dir.path().join("failed.jsonl.partial").exists());
    }
}
