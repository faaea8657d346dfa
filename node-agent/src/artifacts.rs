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
//! - `http://` and `https://` URLs of one file (a GGUF, say): downloaded
//!   into the agent's artifact cache (`artifact_cache_dir`) before the
//!   engine starts, while the replica is Loading, under a name derived from
//!   the URL, so that a later replica of the same artifact finds it there;
//!   a partial download is never taken for the file;
//! - anything else (`s3://`, `gs://`, relative paths) is refused with what
//!   to use instead (a presigned `https://` URL for an object store).
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

/// Where an artifact is on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// There already.
    Local(PathBuf),
    /// To be downloaded from `url` to `path` (see [`fetch`]).
    Fetch { url: String, path: PathBuf },
}

impl Artifact {
    /// The path the engine is given.
    pub fn path(&self) -> &Path {
        match self {
            Artifact::Local(p) | Artifact::Fetch { path: p, .. } => p,
        }
    }
}

/// Where `uri` is, or is to be downloaded to: [`resolve`] for local and
/// `hf://` artifacts, a path under `download_cache` for `http(s)://` ones.
pub fn locate(
    uri: &str,
    hf_cache: Option<&Path>,
    download_cache: Option<&Path>,
) -> Result<Artifact, String> {
    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
        return resolve(uri, hf_cache).map(Artifact::Local);
    }
    let url = reqwest::Url::parse(uri)
        .map_err(|e| format!("artifact {uri:?} is not a valid URL: {e}"))?;
    if url.host_str().is_none_or(str::is_empty)
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(format!(
            "artifact {uri:?} must name a host and carry no user or password in the URL"
        ));
    }
    let Some(cache) = download_cache else {
        return Err(format!(
            "artifact {uri:?}: this agent has no artifact cache to download into; set artifact_cache_dir"
        ));
    };
    // the last path segment, kept as the file name (engines look at the
    // extension), made safe
    let name: String = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = match name.trim_start_matches('.') {
        "" => "artifact".to_string(),
        n => n.to_string(),
    };
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uri.as_bytes());
    let dir: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = cache.join(dir).join(name);
    if path.is_file() {
        return Ok(Artifact::Local(path));
    }
    Ok(Artifact::Fetch {
        url: uri.to_string(),
        path,
    })
}

/// Downloads `url` to `path` (through `<path>.partial`, renamed when whole:
/// a download cut short is never taken for the file). One download per
/// path at a time; one that finds the file there already returns at once.
pub async fn fetch(http: &reqwest::Client, url: &str, path: &Path) -> Result<(), String> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    static FETCHING: std::sync::Mutex<
        Option<std::collections::HashMap<PathBuf, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::Mutex::new(None);
    let lock = FETCHING
        .lock()
        .expect("fetch lock poisoned")
        .get_or_insert_with(Default::default)
        .entry(path.to_path_buf())
        .or_default()
        .clone();
    let _one = lock.lock().await;
    if path.is_file() {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("artifact cache {}: {e}", dir.display()))?;
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("downloading artifact {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "downloading artifact {url}: the server answered {}",
            response.status()
        ));
    }
    let expected = response.content_length();
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| format!("artifact cache {}: {e}", partial.display()))?;
    let mut body = response.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| format!("downloading artifact {url}: cut off after {got} bytes: {e}"))?;
        got += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("artifact cache {}: {e}", partial.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("artifact cache {}: {e}", partial.display()))?;
    if let Some(n) = expected {
        if n != got {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(format!(
                "downloading artifact {url}: got {got} of {n} bytes"
            ));
        }
    }
    tokio::fs::rename(&partial, path)
        .await
        .map_err(|e| format!("artifact cache {}: {e}", path.display()))
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
            "s3" | "gs" => format!(
                "artifact {uri:?}: this agent does not sign {scheme}:// requests; give a presigned https:// URL of the object, copy the model onto the node and name it file:///path, or put it in the Hugging Face cache and name it hf://org/name"
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
            ("s3://bucket/m", "presigned https:// URL"),
            ("models/m.gguf", "neither"),
        ] {
            let e = resolve(uri, c).unwrap_err();
            assert!(e.contains(expected), "{uri}: {e}");
        }
        let e = resolve("hf://org/tiny", None).unwrap_err();
        assert!(e.contains("HF_HUB_CACHE"), "{e}");
    }

    #[tokio::test]
    async fn http_artifacts_are_downloaded_once_into_the_cache() {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/models/tiny.gguf", get(|| async { "GGUF weights" }))
            .route(
                "/gone.gguf",
                get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cache = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/models/tiny.gguf?sig=abc");
        let Artifact::Fetch { url: u, path } = locate(&url, None, Some(cache.path())).unwrap()
        else {
            panic!("not in the cache yet");
        };
        assert_eq!(path.file_name().unwrap(), "tiny.gguf");
        let http = reqwest::Client::new();
        fetch(&http, &u, &path).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "GGUF weights");
        // found there the next time, nothing partial left beside it
        assert_eq!(
            locate(&url, None, Some(cache.path())).unwrap(),
            Artifact::Local(path.clone())
        );
        let files: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(files.len(), 1);

        let gone = format!("http://{addr}/gone.gguf");
        let Artifact::Fetch { path, .. } = locate(&gone, None, Some(cache.path())).unwrap() else {
            panic!("not there");
        };
        let e = fetch(&http, &gone, &path).await.unwrap_err();
        assert!(e.contains("404"), "{e}");
        assert!(!path.exists());
        for (uri, says) in [
            ("https://user:pw@host/m.gguf", "no user or password"),
            ("http://", "not a valid URL"),
        ] {
            let e = locate(uri, None, Some(cache.path())).unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
        let e = locate("https://host/m.gguf", None, None).unwrap_err();
        assert!(e.contains("artifact_cache_dir"), "{e}");
    }
}
