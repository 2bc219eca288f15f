//! CPU f64 reference: attention kernels.
