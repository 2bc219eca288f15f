//! otsu kernels (shaders/otsu.wgsl).
