// The training stage behind the actors' interface (training/stage_compute.hpp): the CPU stage is
// stage_model + adamw exactly, gradients round-trip through the all-reduce layout, and devices
// are checked by name (a GPU machine runs the CUDA stage's own tests: tests/cuda/training_test.cpp).
#include <gtest/gtest.h>

#include <cmath>

#include "protocol/errors.hpp"
#include "test_support.hpp"
#include "training/optimizer.hpp"
#include "training/stage_compute.hpp"

namespace troupe {
namespace {

using train::keep_activations;
using train::stage_range;

TEST(training_stage, the_cpu_stage_is_stage_model_with_adamw) {
  const model_config c = test::tiny_config();
  const stage_range range = stage_range::split(c.num_layers, 1, 0);
  train::stage_model<float> model(c, range);
  train::adamw opt(model.parameters());
  const auto stage = train::make_stage_compute(c, range, "cpu", "tf32");
  model.init(3);
  stage->init(3);
  const auto values = stage->values();
  ASSERT_EQ(values.size(), model.parameters().size());
  ASSERT_EQ(stage->parameters().size(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(values[i].name, model.parameters()[i].name);
    EXPECT_EQ(stage->parameters()[i].name, values[i].name);
    EXPECT_EQ(values[i].values, model.parameters()[i].value) << values[i].name;
  }

  const auto b = test::random_training_batch(c, 2, 9, 4);
  const float w = 1.0f / static_cast<float>(b.dims.rows());
  std::vector<float> unused_model, unused_stage;
  const double l_model = model.forward_loss(0, b.tokens, {}, b.targets, b.dims, w, keep_activations::yes, unused_model);
  const double l_stage = stage->forward_loss(0, b.tokens, {}, b.targets, b.dims, w, keep_activations::yes, unused_stage);
  EXPECT_EQ(l_model, l_stage);
  EXPECT_EQ(stage->grad_square_sum(), opt.grad_square_sum());

  // The all-reduce layout: adding the stage's own gradients doubles them; overwriting restores.
  const auto grads = stage->gradients();
  const auto touched = stage->touched();
  stage->add_gradients(grads, touched, false);
  EXPECT_NEAR(stage->grad_square_sum(), 4 * opt.grad_square_sum(), 1e-9 * opt.grad_square_sum());
  stage->add_gradients(grads, touched, true);
  EXPECT_EQ(stage->grad_square_sum(), opt.grad_square_sum());

  const train::optimizer_config oc;
  opt.step(oc, 1, 1e-2, 1.0);
  stage->step(oc, 1, 1e-2, 1.0);
  const auto after = stage->values();
  for (std::size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i].values, model.parameters()[i].value) << after[i].name;
}

TEST(training_stage, devices_are_checked_by_name) {
  const model_config c = test::tiny_config();
  const stage_range range = stage_range::split(c.num_layers, 1, 0);
  EXPECT_EQ(train::place_stage("cpu", 3), "cpu");
  EXPECT_THROW(train::place_stage("tpu", 0), input_error);
  EXPECT_THROW(train::make_stage_compute(c, range, "tpu", "tf32"), input_error);
  try {  // a GPU machine places stage actor i on GPU i mod count; elsewhere a clear error
    EXPECT_EQ(train::place_stage("cuda", 0), "cuda:0");
  } catch (const input_error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
  // No device all-reduce for CPU stages, a single replica, or two replicas on one GPU.
  EXPECT_EQ(train::make_device_group({"cpu", "cpu"}), nullptr);
  EXPECT_EQ(train::make_device_group({"cuda:0"}), nullptr);
  EXPECT_EQ(train::make_device_group({"cuda:0", "cuda:0"}), nullptr);
}

}  // namespace
}  // namespace troupe
