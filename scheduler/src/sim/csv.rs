//! A minimal reader for the plain comma-separated files of the data sets
//! (no quoting), with errors that name the file and line.

use std::fmt;
use std::path::{Path, PathBuf};

/// A data file could not be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub path: PathBuf,
    /// 1-based line number; 0 when the error concerns the whole file.
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.msg)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.msg)
        }
    }
}

impl std::error::Error for LoadError {}

/// Rows of a CSV file: `(line number, fields)`, skipping empty lines.
pub struct Table {
    pub path: PathBuf,
    pub header: Option<Vec<String>>,
    pub rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// Read `path`; with `has_header` the first line names the columns.
    pub fn read(path: &Path, has_header: bool) -> Result<Table, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError {
            path: path.to_path_buf(),
            line: 0,
            msg: format!("cannot read: {e}"),
        })?;
        let mut header = None;
        let mut rows = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            if line.contains('"') {
                return Err(LoadError {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: "quoted fields are not supported".into(),
                });
            }
            let fields: Vec<String> = line.split(',').map(|s| s.trim().to_string()).collect();
            if has_header && header.is_none() {
                header = Some(fields);
            } else {
                rows.push((i + 1, fields));
            }
        }
        if has_header && header.is_none() {
            return Err(LoadError {
                path: path.to_path_buf(),
                line: 0,
                msg: "empty file: no header".into(),
            });
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// Column index by header name.
    pub fn col(&self, name: &str) -> Option<usize> {
        self.header.as_ref()?.iter().position(|h| h == name)
    }

    /// Column index by header name, or an error naming the missing column.
    pub fn need_col(&self, name: &str) -> Result<usize, LoadError> {
        self.col(name).ok_or_else(|| LoadError {
            path: self.path.clone(),
            line: 1,
            msg: format!("missing column {name:?}"),
        })
    }

    /// An error at `line`.
    pub fn err(&self, line: usize, msg: impl Into<String>) -> LoadError {
        LoadError {
            path: self.path.clone(),
            line,
            msg: msg.into(),
        }
    }

    /// Field `col` of a row parsed as `T`, with a precise error.
    pub fn parse<T: std::str::FromStr>(
        &self,
        line: usize,
        fields: &[String],
        col: usize,
        what: &str,
    ) -> Result<T, LoadError>
    where
        T::Err: fmt::Display,
    {
        let raw = fields
            .get(col)
            .ok_or_else(|| self.err(line, format!("missing field {what} (column {})", col + 1)))?;
        raw.parse::<T>()
            .map_err(|e| self.err(line, format!("bad {what} {raw:?}: {e}")))
    }
}
