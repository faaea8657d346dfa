//! The fuzzers' entry point for the CLI (`fuzz/fuzz_targets/cli_args.rs`):
//! `talon`'s arguments, parsed as the binary parses them (clap, the value
//! parsers for members and labels, subcommands and their flags), running
//! nothing. A panic or hang is a finding. Built with the `fuzzing` feature
//! and in tests, which replay `fuzz/corpus/cli_args` and
//! `fuzz/regressions/cli_args`.

use std::ffi::OsString;

/// Arguments, one per NUL-separated piece of `data` (bytes as they come:
/// arguments need not be UTF-8), after the program name.
pub fn cli_args(data: &[u8]) {
    if data.len() > 4096 {
        return;
    }
    let args = std::iter::once(OsString::from("talon")).chain(data.split(|&b| b == 0).map(os));
    if let Err(e) = crate::cli::parse_args(args) {
        // what a person sees: the usage error, with its suggestions
        let _ = e.render().to_string();
    }
}

#[cfg(unix)]
fn os(bytes: &[u8]) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes).to_os_string()
}

#[cfg(not(unix))]
fn os(bytes: &[u8]) -> OsString {
    String::from_utf8_lossy(bytes).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds and every regression run clean, and the
    /// arguments a person types parse (or are refused) as the binary does.
    #[test]
    fn seeds_and_regressions_run_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut seen = 0;
        for dir in ["corpus/cli_args", "regressions/cli_args"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries {
                cli_args(&std::fs::read(entry.unwrap().path()).unwrap());
                seen += 1;
            }
        }
        assert!(seen >= 5, "the cli_args seeds are missing");
        let parse = |line: &str| crate::cli::parse_args(line.split(' '));
        assert!(parse("talon model create m --version v1 --engine vllm --artifact hf://o/m --memory-mib 1 --latency-slo-ms 5 --label a=b").is_ok());
        let err = parse("talon model label m --set novalue")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"novalue\" is not KEY=VALUE"), "{err}");
        let err = parse("talon cluster init --member x=h:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node id \"x\""), "{err}");
        cli_args(b"cluster\0init\0--member\0\xff=\x00");
    }
}
