#include "chunk_exchange.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "segment.h"

namespace easgd {
namespace shm {

std::vector<ChunkSpan> chunk_plan(int64_t offset, int64_t n, int64_t chunk_numel, int worker,
                                  int workers) {
  if (offset < 0 || chunk_numel < 1 || workers < 1 || worker < 0 || worker >= workers) {
    throw std::invalid_argument("chunk_plan: offset >= 0, chunk_numel >= 1 and 0 <= worker < workers");
  }
  std::vector<ChunkSpan> plan;
  if (n <= 0) return plan;
  const int64_t first = offset / chunk_numel, last = (offset + n - 1) / chunk_numel;
  const int64_t count = last - first + 1;
  const int64_t start = int64_t(worker) * count / int64_t(workers);
  plan.reserve(size_t(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = first + (start + i) % count;
    plan.push_back({k, std::max(offset, k * chunk_numel) - offset,
                    std::min(offset + n, (k + 1) * chunk_numel) - offset});
  }
  return plan;
}

KernelCall ChunkRule::at(int64_t begin, float* center, const float* me_bad,
                         OnNonFinite policy) const {
  return std::visit([&](auto a) -> KernelCall {
    using A = decltype(a);
    a.x = a.x.offset(begin);
    a.center = Buf{center, DType::f32};
    if constexpr (std::is_same_v<A, DownpourAsyncExchangeArgs>) a.x_last = a.x_last.offset(begin);
    a.guard.me_bad = me_bad;
    a.guard.policy = policy;
    return a;
  }, proto);
}

Buf ChunkRule::x() const {
  return std::visit([](const auto& a) { return a.x; }, proto);
}

Buf ChunkRule::x_last() const {
  return std::visit([](const auto& a) {
    if constexpr (std::is_same_v<std::decay_t<decltype(a)>, DownpourAsyncExchangeArgs>) return a.x_last;
    return Buf{};
  }, proto);
}

namespace {

// The CPU exchange: one pass to check x, then each chunk in place under its lock.
ExchangeResult exchange_cpu(Segment& seg, int worker, const ChunkRule& rule, int64_t offset,
                            int64_t numel, const ExchangeOptions& o) {
  ExchangeResult result;
  Exec exec;
  exec.num_threads = std::max(1, o.num_threads);
  float me_bad = 0.f;
  cpu::launch(CheckFiniteArgs{rule.x(), &me_bad}, numel, exec);
  result.nonfinite = me_bad != 0.f;
  const bool writes_center = !result.nonfinite;
  if (result.nonfinite && o.policy == OnNonFinite::skip) return result;  // nothing to write
  for (const ChunkSpan& span : chunk_plan(offset, numel, seg.header().chunk_numel, worker,
                                          int(seg.header().max_workers))) {
    if (seg.acquire_for_update(worker, span.chunk, o.lock_timeout_s) != LockResult::acquired) {
      ++result.recovered_locks;
    }
    try {
      cpu::launch(rule.at(span.begin, seg.data() + offset + span.begin, &me_bad, o.policy),
                  span.end - span.begin, exec);
    } catch (...) {
      seg.release_after_update(span.chunk, false);
      throw;
    }
    seg.release_after_update(span.chunk, writes_center);
  }
  return result;
}

#if defined(EASGD_EXT_WITH_CUDA)
class SegmentLocks : public cuda::ChunkLocks {
 public:
  SegmentLocks(Segment& seg, int worker, double timeout) : seg_(seg), worker_(worker), timeout_(timeout) {}
  void acquire(int64_t chunk) override {
    if (seg_.acquire_for_update(worker_, chunk, timeout_) != LockResult::acquired) ++recovered;
  }
  void release(int64_t chunk, bool updated) override { seg_.release_after_update(chunk, updated); }
  int recovered = 0;

 private:
  Segment& seg_;
  int worker_;
  double timeout_;
};
#endif

}  // namespace

ExchangeResult exchange(Segment& seg, int worker, const ChunkRule& rule, int device,
                        int64_t offset, int64_t numel, const ExchangeOptions& options) {
  seg.worker(worker);  // range check before anything is locked
  if (offset < 0 || numel < 0 || offset + numel > seg.numel()) {
    throw std::invalid_argument("center range [" + std::to_string(offset) + ", " +
                                std::to_string(offset + numel) + ") is outside shared center '" +
                                seg.name() + "' of " + std::to_string(seg.numel()) + " elements");
  }
  if (device < 0) return exchange_cpu(seg, worker, rule, offset, numel, options);
#if defined(EASGD_EXT_WITH_CUDA)
  if (options.staging == nullptr || options.staging_slots < 1 || options.me_bad_device == nullptr ||
      options.copy_queues == nullptr) {
    throw std::invalid_argument("a CUDA exchange needs a staging ring, a device flag and its copy queues");
  }
  const auto plan = chunk_plan(offset, numel, seg.header().chunk_numel, worker,
                               int(seg.header().max_workers));
  SegmentLocks locks(seg, worker, options.lock_timeout_s);
  ExchangeResult result;
  result.nonfinite = cuda::pipeline_exchange(rule, device, seg.data() + offset, plan, options,
                                             seg.header().chunk_numel, locks);
  result.recovered_locks = locks.recovered;
  return result;
#else
  throw std::runtime_error("CUDA parameters need easgd_ext built with CUDA");
#endif
}

}  // namespace shm
}  // namespace easgd
