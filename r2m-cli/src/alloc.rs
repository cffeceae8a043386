//! Keep freed memory in the process, as PyTorch's caching allocator does.
//!
//! By default glibc's `malloc` serves blocks over 128 KiB-32 MiB with `mmap` and gives the top of
//! the heap back to the OS when it is freed. A forward or training step allocates and frees the
//! same large tensors (activations, logits, gradients) again and again, so each of them comes back
//! as fresh pages that the kernel faults in and zeroes: on the CPU backend that was 10-15% of a
//! training step (`clear_page_erms` and `exc_page_fault` in `perf`). With no `mmap` and no trimming
//! the freed blocks are reused instead; the price is that the process keeps its peak heap.

/// Turn off `mmap` for large blocks and heap trimming (glibc only; elsewhere a no-op).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called once, before any thread
    // other than main exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1 disables trimming (see `man mallopt`).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
