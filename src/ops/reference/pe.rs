//! CPU f64 reference: pe kernels.
