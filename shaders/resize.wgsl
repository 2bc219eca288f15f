// resize kernels
