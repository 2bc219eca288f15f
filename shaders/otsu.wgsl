// otsu kernels
