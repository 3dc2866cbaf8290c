#include "actors/compute.hpp"

#include "gpu/make_backend.hpp"

namespace troupe {

shared_compute load_compute(const std::string& model_dir, int threads, const std::string& device) {
  auto c = std::make_shared<compute_context>();
  c->model_dir = model_dir;
  c->be = make_backend(device, threads);
  c->net = model::load(model_dir, *c->be);
  return c;
}

}  // namespace troupe
