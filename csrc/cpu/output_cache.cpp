// The output cache of output_cache.h: a c10::Allocator whose large blocks go back to a bounded
// idle list when their tensor dies, and come out of it for the next request of the same size.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace lowrank_kernels::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Smaller blocks stay with the default allocator: malloc reuses them from its heap anyway.
constexpr size_t kMinBytes = size_t{1} << 20;
constexpr int64_t kDefaultLimitMiB = 1024;

size_t round_to_huge_pages(size_t n) { return (n + kHugePage - 1) / kHugePage * kHugePage; }

int64_t limit_from_environment() {
  const char* value = std::getenv("LOWRANK_KERNELS_OUTPUT_CACHE_MB");
  if (value == nullptr || *value == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK(*end == '\0' && mib >= 0, "LOWRANK_KERNELS_OUTPUT_CACHE_MB must be a non-negative integer "
              "(MiB of freed op outputs kept for reuse; 0 disables the cache), got '", value, "'");
  return static_cast<int64_t>(mib) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  // Never destroyed: tensors may outlive static destruction at interpreter exit.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = round_to_huge_pages(n);
    void* block = take_idle(bytes);
    if (block == nullptr) block = map_block(bytes);
    return {block, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(idle_bytes_), limit_, hits_, misses_};
  }

  void set_limit(int64_t max_bytes) {
    TORCH_CHECK(max_bytes >= 0, "set_output_cache_limit: max_bytes must be >= 0, got ", max_bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = max_bytes;
    trim_locked();
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t limit = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = limit;
  }

 private:
  OutputCache() : limit_(limit_from_environment()) {}

  void* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = idle_.find(bytes);
    if (it == idle_.end()) {
      ++misses_;
      return nullptr;
    }
    void* block = it->second;
    idle_.erase(it);
    idle_bytes_ -= bytes;
    live_.emplace(block, bytes);
    ++hits_;
    return block;
  }

  void* map_block(size_t bytes) {
    void* block = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(block != nullptr, "lowrank_kernels: out of memory allocating ", bytes, " bytes for an op output");
    // A hint: where transparent huge pages are off the kernel ignores it.
    madvise(block, bytes, MADV_HUGEPAGE);
    std::lock_guard<std::mutex> lock(mutex_);
    live_.emplace(block, bytes);
    return block;
  }

  static void release(void* block) { get().give_back(block); }

  void give_back(void* block) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto it = live_.find(block);
    const size_t bytes = it->second;
    live_.erase(it);
    if (static_cast<int64_t>(idle_bytes_ + bytes) <= limit_) {
      idle_.emplace(bytes, block);
      idle_bytes_ += bytes;
      return;
    }
    lock.unlock();
    std::free(block);
  }

  // Frees idle blocks, largest first, until the idle bytes fit the limit.
  void trim_locked() {
    while (static_cast<int64_t>(idle_bytes_) > limit_) {
      auto largest = std::prev(idle_.end());
      idle_bytes_ -= largest->first;
      std::free(largest->second);
      idle_.erase(largest);
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // bytes -> block
  std::unordered_map<void*, size_t> live_;  // block -> bytes, of blocks handed out
  size_t idle_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(shape, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

std::vector<int64_t> output_cache_info() { return OutputCache::get().info(); }

void set_output_cache_limit(int64_t max_bytes) { OutputCache::get().set_limit(max_bytes); }

void empty_output_cache() { OutputCache::get().empty(); }

}  // namespace lowrank_kernels::cpu
