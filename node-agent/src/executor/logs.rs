//! Engine logs, rotated by size: an engine's stdout and stderr go through
//! the agent into `<log>`; when it would grow past its limit it becomes
//! `<log>.1` (the older ones shift to `.2` …, the oldest beyond `keep` is
//! removed) and a new `<log>` starts. Nothing the engine writes is dropped
//! on rotation, and an engine that logs a lot cannot fill the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Default size one engine log may reach before it is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default number of rotated files kept beside the live one.
pub const DEFAULT_KEEP: u32 = 3;

/// A log file that rotates itself.
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

impl RotatingLog {
    /// Opens (appending to) `path`.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file: Some(file),
            size,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(self.rotated(self.keep)).or_else(ignore_missing)?;
            for n in (1..self.keep).rev() {
                std::fs::rename(self.rotated(n), self.rotated(n + 1)).or_else(ignore_missing)?;
            }
            std::fs::rename(&self.path, self.rotated(1)).or_else(ignore_missing)?;
        }
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    /// Appends `bytes`, rotating first when they would not fit (a write
    /// larger than the limit goes whole into a fresh file).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                self.rotate()?;
                self.file.as_mut().expect("rotate opens the file")
            }
        };
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Copies `stream` (an engine's stdout or stderr) into `log` until it ends.
/// A log that cannot be written is reported once; the engine's output is
/// then read and dropped, so that the engine never blocks on a full pipe.
pub async fn pump(mut stream: impl AsyncRead + Unpin, log: Arc<Mutex<RotatingLog>>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut failed = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let written = log.lock().expect("log lock poisoned").write(&buf[..n]);
        if let Err(e) = written {
            if !failed {
                tracing::warn!(error = %e, "cannot write the engine log; its output is dropped");
                failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 10, 2).expect("opens");
        for line in [
            "aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n", "gggg\n",
        ] {
            log.write(line.as_bytes()).expect("writes");
        }
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(path.clone()), "gggg\n");
        assert_eq!(read(dir.path().join("engine.log.1")), "eeee\nffff\n");
        assert_eq!(read(dir.path().join("engine.log.2")), "cccc\ndddd\n");
        assert!(
            !dir.path().join("engine.log.3").exists(),
            "only `keep` rotated files"
        );
        // a write larger than the limit is kept whole
        log.write(&[b'x'; 25]).expect("writes");
        assert_eq!(read(path).len(), 25);
    }

    #[test]
    fn reopening_appends_and_counts_what_is_there() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("engine.log");
        RotatingLog::open(&path, 8, 1)
            .expect("opens")
            .write(b"123456")
            .expect("writes");
        let mut again = RotatingLog::open(&path, 8, 1).expect("opens");
        again.write(b"789").expect("writes");
        assert_eq!(std::fs::read_to_string(&path).expect("log"), "789");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("engine.log.1")).expect("rotated"),
            "123456"
        );
    }
}
