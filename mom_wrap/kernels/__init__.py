"""Our own Triton kernels (they run under TRITON_INTERPRET=1 too)."""
