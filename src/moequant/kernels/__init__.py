"""kernels: one op schema per decode/GEMM, a pure-torch reference each, CPU (and later Triton) implementations."""
