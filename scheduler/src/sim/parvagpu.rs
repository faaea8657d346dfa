//! ParvaGPU loader (filled below).
