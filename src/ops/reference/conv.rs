//! CPU f64 reference: conv kernels.
