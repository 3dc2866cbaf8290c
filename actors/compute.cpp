#include "actors/compute.hpp"

#include "gpu/cpu/cpu_backend.hpp"

namespace troupe {

shared_compute load_compute(const std::string& model_dir, int threads) {
  auto c = std::make_shared<compute_context>();
  c->model_dir = model_dir;
  c->be = std::make_unique<cpu_backend>(threads);
  c->net = model::load(model_dir, *c->be);
  return c;
}

}  // namespace troupe
