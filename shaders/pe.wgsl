// pe kernels
