//! Clock skew for the members of a test cluster: each runs with Debian's
//! libfaketime preloaded and reads its wall-clock offset from a file of
//! its own, which the nemesis rewrites to step that member's clock forward
//! or back while it runs. The monotonic clock — what Raft's timers read —
//! is left alone, as NTP leaves it; what moves is what `SystemTime` says
//! (entry times, audit times, expiry checks).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where Debian's `libfaketime` package puts the multi-threaded library.
const LIBRARIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// One offset file per member, in `dir`.
pub struct Clocks {
    dir: PathBuf,
    library: PathBuf,
}

impl Clocks {
    /// Clocks for members whose offset files live in `dir` (every member
    /// starts at +0 s); an error names the package to install.
    pub fn new(dir: &Path) -> anyhow::Result<Clocks> {
        let Some(library) = LIBRARIES.iter().map(PathBuf::from).find(|p| p.exists()) else {
            bail!(
                "libfaketime is not installed (looked for {}): apt-get install libfaketime",
                LIBRARIES.join(", ")
            );
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Clocks {
            dir: dir.to_path_buf(),
            library,
        })
    }

    fn file(&self, member: usize) -> PathBuf {
        self.dir.join(format!("clock-{member}"))
    }

    /// The environment member `member` runs with (its offset file is
    /// written at +0 s if it has none yet).
    pub fn env(&self, member: usize) -> anyhow::Result<Vec<(String, String)>> {
        if !self.file(member).exists() {
            self.set(member, 0)?;
        }
        Ok(vec![
            ("LD_PRELOAD".into(), self.library.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file(member).display().to_string(),
            ),
            // read the file again at most once a second
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            // no shared-memory segment between processes
            ("FAKETIME_DISABLE_SHM".into(), "1".into()),
        ])
    }

    /// Steps member `member`'s wall clock to `offset_s` seconds from the
    /// real time (whole file replaced at once: never read half-written).
    pub fn set(&self, member: usize, offset_s: i64) -> anyhow::Result<()> {
        let file = self.file(member);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset_s:+}s\n"))
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))
    }
}
