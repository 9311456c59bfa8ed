// The output cache of output_cache.h: a c10::Allocator whose large blocks go back to a bounded
// idle list when their tensor dies, and come out of it for the next request of the same size.
// Idle blocks are evicted oldest first: when a freed block would exceed the limit, and before a
// miss maps a new block (so idle + new stays within the limit: a miss never raises the peak by
// more than the limit).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <unordered_map>

namespace lowrank_kernels::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Smaller blocks stay with the default allocator: malloc reuses them from its heap anyway.
constexpr size_t kMinBytes = size_t{1} << 20;
constexpr int64_t kDefaultLimitMiB = 512;
const c10::Device kCpu(c10::DeviceType::CPU);

size_t round_to_huge_pages(size_t n) { return (n + kHugePage - 1) / kHugePage * kHugePage; }

int64_t limit_from_environment() {
  const char* value = std::getenv("LOWRANK_KERNELS_OUTPUT_CACHE_MB");
  if (value == nullptr || *value == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK(*end == '\0' && errno == 0 && mib >= 0 && mib <= (std::numeric_limits<int64_t>::max() >> 20),
              "LOWRANK_KERNELS_OUTPUT_CACHE_MB must be a non-negative integer below 2^43 (MiB of freed op "
              "outputs kept for reuse; 0 disables the cache), got '",
              value, "'");
  return static_cast<int64_t>(mib) << 20;
}

struct Block {
  void* data;
  size_t bytes;
};

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
    return {block, block, &release, kCpu};
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
    trim_locked(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0);
  }

 private:
  OutputCache() : limit_(limit_from_environment()) {
    // A child forked while another thread held the lock would deadlock on it: the forking
    // thread holds it across fork() and both sides release it.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
  }

  // The most recently freed idle block of `bytes`, or null (a miss, after evicting the oldest
  // idle blocks until a new block of `bytes` fits beside the rest).
  void* take_idle(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* block = it->data;
      idle_.erase(std::next(it).base());
      idle_bytes_ -= bytes;
      hand_out_locked(block, bytes);
      ++hits_;
      return block;
    }
    ++misses_;
    trim_locked(limit_ > static_cast<int64_t>(bytes) ? limit_ - static_cast<int64_t>(bytes) : 0);
    return nullptr;
  }

  void* map_block(size_t bytes) {
    void* block = std::aligned_alloc(kHugePage, bytes);
    if (block == nullptr) {  // out of memory: give the idle blocks back and try once more
      empty();
      block = std::aligned_alloc(kHugePage, bytes);
    }
    TORCH_CHECK(block != nullptr, "lowrank_kernels: out of memory allocating ", bytes, " bytes for an op output");
    // A hint: where transparent huge pages are off the kernel ignores it.
    madvise(block, bytes, MADV_HUGEPAGE);
    std::lock_guard<std::mutex> lock(mutex_);
    hand_out_locked(block, bytes);
    return block;
  }

  // Records a block handed to a tensor, and reports it to the profiler (profile_memory=True sees
  // these blocks like the default allocator's).
  void hand_out_locked(void* block, size_t bytes) {
    live_.emplace(block, bytes);
    live_bytes_ += bytes;
    c10::reportMemoryUsageToProfiler(block, static_cast<int64_t>(bytes), live_bytes_, live_bytes_ + idle_bytes_, kCpu);
  }

  static void release(void* block) { get().give_back(block); }

  void give_back(void* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(block);
    TORCH_INTERNAL_ASSERT(it != live_.end(), "output cache: freeing a block it did not hand out");
    const size_t bytes = it->second;
    live_.erase(it);
    live_bytes_ -= bytes;
    idle_.push_back({block, bytes});
    idle_bytes_ += bytes;
    trim_locked(limit_);
    c10::reportMemoryUsageToProfiler(block, -static_cast<int64_t>(bytes), live_bytes_, live_bytes_ + idle_bytes_, kCpu);
  }

  // Frees the oldest idle blocks until the idle bytes are at most max_bytes.
  void trim_locked(int64_t max_bytes) {
    while (static_cast<int64_t>(idle_bytes_) > max_bytes) {
      idle_bytes_ -= idle_.front().bytes;
      std::free(idle_.front().data);
      idle_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Block> idle_;                  // oldest first
  std::unordered_map<void*, size_t> live_;  // block -> bytes, of blocks handed out
  size_t idle_bytes_ = 0, live_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu() && !options.pinned_memory());
  return at::detail::empty_generic(shape, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

std::vector<int64_t> output_cache_info() { return OutputCache::get().info(); }

void set_output_cache_limit(int64_t max_bytes) { OutputCache::get().set_limit(max_bytes); }

void empty_output_cache() { OutputCache::get().empty(); }

}  // namespace lowrank_kernels::cpu
