#include <gtest/gtest.h>

#include <fstream>

#include "model/safetensors.hpp"
#include "protocol/errors.hpp"
#include "tests/test_support.hpp"

namespace troupe {
namespace fs = std::filesystem;
namespace {

std::vector<std::pair<std::string, tensor>> sample_tensors() {
  tensor a = tensor::empty({3, 4}, dtype::f32);
  for (int i = 0; i < 12; ++i) a.data<float>()[i] = static_cast<float>(i) * 0.5f;
  tensor b = tensor::empty({5}, dtype::bf16);
  for (int i = 0; i < 5; ++i) b.data<std::uint16_t>()[i] = f32_to_bf16(static_cast<float>(-i));
  return {{"w.a", a}, {"w.b", b}};
}

std::string error_of(const fs::path& dir, const std::string& name = "w.a", shape_t shape = {3, 4}) {
  try {
    checkpoint::open(dir).get(name, shape);
  } catch (const input_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(safetensors, round_trip_single_file_is_zero_copy) {
  const auto dir = test::temp_dir("st_single");
  write_checkpoint(dir, sample_tensors());
  ASSERT_TRUE(fs::exists(dir / "model.safetensors"));
  const auto ck = checkpoint::open(dir);
  const tensor a = ck.get("w.a", {3, 4});
  EXPECT_EQ(a.data<float>()[7], 3.5f);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.raw()) % 4, 0u);  // aligned view into the mapping
  const tensor b = ck.get("w.b", {5});
  EXPECT_EQ(b.type(), dtype::bf16);
  EXPECT_EQ(bf16_to_f32(b.data<std::uint16_t>()[3]), -3.0f);
}

TEST(safetensors, sharded_checkpoint_with_index) {
  const auto dir = test::temp_dir("st_sharded");
  write_checkpoint(dir, sample_tensors(), 20);  // forces two shards
  EXPECT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir / "model-00002-of-00002.safetensors"));
  const auto ck = checkpoint::open(dir);
  EXPECT_EQ(ck.file_of("w.b").filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(ck.get("w.a", {3, 4}).data<float>()[11], 5.5f);
  fs::remove(dir / "model-00002-of-00002.safetensors");
  EXPECT_NE(error_of(dir).find("missing"), std::string::npos);
}

TEST(safetensors, errors_name_file_and_tensor) {
  const auto dir = test::temp_dir("st_errors");
  write_checkpoint(dir, sample_tensors());
  EXPECT_NE(error_of(dir, "w.c").find("missing tensor 'w.c'"), std::string::npos);
  const auto shape_err = error_of(dir, "w.a", {4, 3});
  EXPECT_NE(shape_err.find("'w.a' has shape [3, 4], expected [4, 3]"), std::string::npos) << shape_err;
  EXPECT_NE(shape_err.find("model.safetensors"), std::string::npos);

  // Truncated: drop the last bytes of the data section.
  const auto file = dir / "model.safetensors";
  const auto size = fs::file_size(file);
  fs::resize_file(file, size - 3);
  EXPECT_NE(error_of(dir).find("truncated"), std::string::npos) << error_of(dir);

  // Corrupt header: a header length beyond the file.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    const std::uint64_t huge = 1ull << 40;
    f.write(reinterpret_cast<const char*>(&huge), 8);
  }
  EXPECT_NE(error_of(dir).find("corrupt header"), std::string::npos) << error_of(dir);

  // Corrupt header: not JSON.
  {
    std::ofstream f(file, std::ios::binary | std::ios::trunc);
    const std::uint64_t len = 8;
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << "{garbage";
  }
  EXPECT_NE(error_of(dir).find("corrupt header"), std::string::npos) << error_of(dir);
}

TEST(safetensors, integer_tensor_where_weights_are_expected) {
  const auto dir = test::temp_dir("st_dtype");
  tensor ids = tensor::zeros({3, 4}, dtype::i32);
  write_checkpoint(dir, {{"w.a", ids}});
  EXPECT_NE(error_of(dir).find("expected a float type"), std::string::npos) << error_of(dir);
}

}  // namespace troupe
