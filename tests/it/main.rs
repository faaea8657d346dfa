//! Multi-process integration tests: real coordinator processes on loopback.
//!
//! One test binary (faster to link than many). Each test owns its processes
//! and temporary directories and cleans them up when it ends.

mod agents;
mod autoscale;
mod bad_input;
mod chain;
mod cluster;
mod dashboard;
mod deploy;
mod engines;
mod executors;
mod fallback;
mod gateway;
mod harness;
mod linearizable;
mod native;
mod pipelines;
mod placement;
mod protos;
mod rollout;
mod serving;
mod tenants;
mod tls;
mod traces;
mod trust;
