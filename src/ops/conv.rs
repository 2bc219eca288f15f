//! conv kernels (shaders/conv.wgsl).
