//! CPU f64 reference: otsu kernels.
