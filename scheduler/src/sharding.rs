//! Sharding planner (filled below).
