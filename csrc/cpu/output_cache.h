// Recycled pages for large CPU op outputs.
//
// A fresh multi-MiB tensor costs the kernel a page fault and a page of zeroing per page on first
// touch; for a memory-bound op such as dequantize_nf4 that is slower than the op itself
// (4096x4096 fp32: ~6 ms of faults around ~3.5 ms of decoding on the reference machine). Outputs
// allocated here come from a bounded cache of freed blocks (2 MiB-aligned, advised as
// transparent huge pages), so an op called again on the same shape writes into pages that are
// already mapped — what the CUDA caching allocator does for device memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace lowrank_kernels::cpu {

// An uninitialised contiguous CPU tensor; blocks of 1 MiB and more are recycled.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

// The ops output_cache_info() -> [idle bytes, limit bytes, hits, misses],
// set_output_cache_limit(max_bytes) (0 disables the cache) and empty_output_cache().
// The limit starts at LOWRANK_KERNELS_OUTPUT_CACHE_MB (default 1024 MiB).
std::vector<int64_t> output_cache_info();
void set_output_cache_limit(int64_t max_bytes);
void empty_output_cache();

}  // namespace lowrank_kernels::cpu
