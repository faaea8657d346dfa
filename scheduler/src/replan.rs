//! Re-planning (filled below).
