// Recycled pages for large CPU op outputs.
//
// A fresh multi-MiB tensor costs the kernel a page fault and a page of zeroing per page on first
// touch; for a memory-bound op such as dequantize_nf4 that costs more than the op itself
// (4096x4096 fp32 on the reference machine: ~2.3 ms into recycled pages, ~7-9 ms into fresh
// ones). Outputs allocated here come from a bounded cache of freed blocks: a block goes back to
// the cache when its tensor dies and serves the next output of the same size (rounded up to
// 2 MiB), so a repeated op writes into pages that are already mapped. Fresh blocks are 2 MiB
// aligned and advised as transparent huge pages (512x fewer faults where THP is enabled).
// Unlike PyTorch's CUDA caching allocator, blocks are never split: reuse is by exact rounded size.
//
// The idle blocks stay resident (RSS) up to the limit, in every process that used the cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace lowrank_kernels::cpu {

// An uninitialised contiguous CPU tensor (dtype from `options`; pinned memory is not supported);
// blocks of 1 MiB and more are recycled.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

// The ops output_cache_info() -> [idle bytes, limit bytes, hits, misses],
// set_output_cache_limit(max_bytes) (0 disables the cache) and empty_output_cache().
// The limit starts at LOWRANK_KERNELS_OUTPUT_CACHE_MB (default 512 MiB), read at first use.
std::vector<int64_t> output_cache_info();
void set_output_cache_limit(int64_t max_bytes);
void empty_output_cache();

}  // namespace lowrank_kernels::cpu
