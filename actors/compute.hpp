// What the actors of one process share: the loaded model (immutable weights, the backend).
// Each actor keeps its own per-sequence state; the model object holds none.
#pragma once

#include <memory>
#include <string>

#include "gpu/backend.hpp"
#include "model/model.hpp"

namespace troupe {

struct compute_context {
  std::string model_dir;  // where the model came from (a draft's tokenizer is compared with its)
  std::unique_ptr<backend> be;
  std::unique_ptr<model> net;
};

using shared_compute = std::shared_ptr<compute_context>;

/// Loads `model_dir` on `device` ("cpu", "cuda", "cuda:N"; gpu/make_backend) with `threads` CPU
/// threads (0 = all cores). Every actor of the process enqueues on that one backend: on a GPU one
/// stream orders their ops, so a tensor handed to another actor is ready for its next op.
shared_compute load_compute(const std::string& model_dir, int threads, const std::string& device = "cpu");

}  // namespace troupe
