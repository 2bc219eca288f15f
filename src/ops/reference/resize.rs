//! CPU f64 reference: resize kernels.
