#include "training/cuda/device_group.hpp"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "gpu/cuda/cuda_check.hpp"
#ifdef TROUPE_WITH_NCCL
#include <nccl.h>
#endif

namespace troupe::train {

#ifdef TROUPE_WITH_NCCL

#define TROUPE_NCCL_CHECK(call)                                                                               \
  do {                                                                                                        \
    const ncclResult_t troupe_nccl_ = (call);                                                                 \
    if (troupe_nccl_ != ncclSuccess)                                                                          \
      throw std::runtime_error(std::string("NCCL error: ") + ncclGetErrorString(troupe_nccl_) + " in " + #call + \
                               " at " + __FILE__ + ":" + std::to_string(__LINE__));                          \
  } while (0)

struct device_group {
  std::vector<ncclComm_t> comms;
  ~device_group() {
    for (auto c : comms) ncclCommDestroy(c);
  }
};

std::shared_ptr<device_group> open_device_group(const std::vector<int>& devices) {
  auto g = std::make_shared<device_group>();
  g->comms.resize(devices.size());
  TROUPE_NCCL_CHECK(ncclCommInitAll(g->comms.data(), static_cast<int>(devices.size()), devices.data()));
  return g;
}

void all_reduce(device_group& group, int rank, const std::vector<reduce_item>& items, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  ncclComm_t comm = group.comms.at(static_cast<std::size_t>(rank));
  TROUPE_NCCL_CHECK(ncclGroupStart());
  for (const auto& item : items) {
    if (item.count == 0) continue;
    switch (item.type) {
      case reduce_item::kind::f32_sum:
        TROUPE_NCCL_CHECK(ncclAllReduce(item.data, item.data, item.count, ncclFloat32, ncclSum, comm, s));
        break;
      case reduce_item::kind::u8_max:
        TROUPE_NCCL_CHECK(ncclAllReduce(item.data, item.data, item.count, ncclUint8, ncclMax, comm, s));
        break;
      case reduce_item::kind::i64_sum:
        TROUPE_NCCL_CHECK(ncclAllReduce(item.data, item.data, item.count, ncclInt64, ncclSum, comm, s));
        break;
    }
  }
  TROUPE_NCCL_CHECK(ncclGroupEnd());
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(s));
}

#else

struct device_group {};

std::shared_ptr<device_group> open_device_group(const std::vector<int>&) { return nullptr; }

void all_reduce(device_group&, int, const std::vector<reduce_item>&, void*) {
  throw std::logic_error("all_reduce: this build has no NCCL");
}

#endif

}  // namespace troupe::train
