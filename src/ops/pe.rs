//! pe kernels (shaders/pe.wgsl).
