//! Model artifacts: what a model spec's `artifact_uri` names, resolved to
//! the local path an engine is given as `{artifact}`.
//!
//! - `file:///abs/path` and plain absolute paths: the file or directory,
//!   which must exist on this node;
//! - `hf://org/name` (optionally `@revision`, and `/path/in/repo` for one
//!   file, e.g. a GGUF): the snapshot in the local Hugging Face cache
//!   (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`), the revision `main` unless given. Nothing
//!   is downloaded: a model that is not in the cache is an error that says
//!   how to put it there;
//! - anything else (`s3://`, `http(s)://`, relative paths) is refused with
//!   what to use instead.
//!
//! The resolved path is checked like any artifact: it can never read as an
//! engine option.

use std::path::{Path, PathBuf};

/// Where the Hugging Face cache of this process is.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The local path of `uri`, looked up in `hf_cache` for `hf://` URIs.
pub fn resolve(uri: &str, hf_cache: Option<&Path>) -> Result<PathBuf, String> {
    let path = if let Some(rest) = uri.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(format!(
                "artifact {uri:?} is not an absolute file URI; write file:///absolute/path"
            ));
        }
        PathBuf::from(rest)
    } else if uri.starts_with('/') {
        PathBuf::from(uri)
    } else if let Some(rest) = uri.strip_prefix("hf://") {
        return hf(uri, rest, hf_cache);
    } else {
        let scheme = uri.split_once("://").map_or("", |(s, _)| s);
        return Err(match scheme {
            "s3" | "http" | "https" | "gs" => format!(
                "artifact {uri:?}: this agent does not download {scheme}:// artifacts; copy the model onto the node and name it file:///path, or put it in the Hugging Face cache and name it hf://org/name"
            ),
            _ => format!(
                "artifact {uri:?} is neither file:///absolute/path, an absolute path nor hf://org/name"
            ),
        });
    };
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "artifact {uri:?} climbs with '..'; name the path directly"
        ));
    }
    if !path.exists() {
        return Err(format!(
            "artifact {uri:?}: {} does not exist on this node",
            path.display()
        ));
    }
    Ok(path)
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `hf://org/name[@revision][/file]` in the cache.
fn hf(uri: &str, rest: &str, hf_cache: Option<&Path>) -> Result<PathBuf, String> {
    let mut parts = rest.splitn(3, '/');
    let (org, name_rev, file) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    let (name, revision) = match name_rev.split_once('@') {
        Some((n, r)) => (n, r),
        None => (name_rev, "main"),
    };
    if !valid_part(org) || !valid_part(name) || !valid_part(revision) {
        return Err(format!(
            "artifact {uri:?} is not hf://org/name[@revision][/file] (letters, digits, '-', '_' and '.' only)"
        ));
    }
    if let Some(f) = file {
        if f.split('/').any(|p| !valid_part(p)) {
            return Err(format!(
                "artifact {uri:?}: the file in the repository must be a plain relative path"
            ));
        }
    }
    let Some(cache) = hf_cache else {
        return Err(format!(
            "artifact {uri:?}: no Hugging Face cache on this node (set HF_HUB_CACHE or HF_HOME)"
        ));
    };
    let repo = cache.join(format!("models--{org}--{name}"));
    let fetch = format!(
        "download it on this node with `huggingface-cli download {org}/{name}` (into {}); the agent does not download",
        cache.display()
    );
    if !repo.is_dir() {
        return Err(format!(
            "artifact {uri:?} is not in the Hugging Face cache ({} is missing): {fetch}",
            repo.display()
        ));
    }
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        let r = repo.join("refs").join(revision);
        std::fs::read_to_string(&r)
            .map_err(|_| {
                format!(
                    "artifact {uri:?}: the cache has no revision {revision:?} of {org}/{name} ({} is missing): {fetch}",
                    r.display()
                )
            })?
            .trim()
            .to_string()
    };
    if !valid_part(&commit) {
        return Err(format!(
            "artifact {uri:?}: the cache's ref {revision:?} holds {commit:?}, not a commit"
        ));
    }
    let snapshot = repo.join("snapshots").join(&commit);
    let path = match file {
        Some(f) => snapshot.join(f),
        None => snapshot,
    };
    if !path.exists() {
        return Err(format!(
            "artifact {uri:?}: {} is not in the cache: {fetch}",
            path.display()
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_paths_and_the_hugging_face_cache_resolve_or_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let file_uri = format!("file://{}", gguf.display());
        assert_eq!(resolve(&file_uri, None).unwrap(), gguf);
        assert_eq!(resolve(gguf.to_str().unwrap(), None).unwrap(), gguf);
        let e = resolve("file:///nope/x.gguf", None).unwrap_err();
        assert!(e.contains("does not exist on this node"), "{e}");
        let e = resolve("file://relative/x", None).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = resolve(&format!("{}/../tiny.gguf", dir.path().display()), None).unwrap_err();
        assert!(e.contains("'..'"), "{e}");

        // a cache laid out as huggingface_hub lays it out
        let cache = dir.path().join("hub");
        let repo = cache.join("models--org--tiny");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("model.gguf"), b"GGUF").unwrap();
        let c = Some(cache.as_path());
        assert_eq!(resolve("hf://org/tiny", c).unwrap(), snap);
        assert_eq!(
            resolve("hf://org/tiny/model.gguf", c).unwrap(),
            snap.join("model.gguf")
        );
        assert_eq!(
            resolve(&format!("hf://org/tiny@{commit}"), c).unwrap(),
            snap
        );
        for (uri, expected) in [
            ("hf://org/other", "huggingface-cli download org/other"),
            ("hf://org/tiny@v2", "no revision \"v2\""),
            ("hf://org/tiny/missing.gguf", "is not in the cache"),
            ("hf://org/tiny/../../etc/passwd", "plain relative path"),
            ("hf://org", "is not hf://org/name"),
            ("hf://-rf/x", "is not in the Hugging Face cache"),
            ("s3://bucket/m", "does not download s3://"),
            ("https://host/m.gguf", "does not download https://"),
            ("models/m.gguf", "neither"),
        ] {
            let e = resolve(uri, c).unwrap_err();
            assert!(e.contains(expected), "{uri}: {e}");
        }
        let e = resolve("hf://org/tiny", None).unwrap_err();
        assert!(e.contains("HF_HUB_CACHE"), "{e}");
    }
}
