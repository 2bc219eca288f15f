//! CPU f64 reference: norm kernels.
