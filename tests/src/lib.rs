//! Talon's multi-process integration tests live in `it/`; this library is
//! empty on purpose so that the package builds as a normal crate.
