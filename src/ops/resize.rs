//! resize kernels (shaders/resize.wgsl).
