#include <gtest/gtest.h>

#include "model/config.hpp"
#include "protocol/errors.hpp"
#include "tests/test_support.hpp"

namespace troupe {
namespace {

std::string error_of(const std::string& json) {
  try {
    parse_model_config(json, "cfg.json");
  } catch (const input_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(config, tiny_config_derives_table_sizes) {
  const auto c = test::tiny_config();
  EXPECT_EQ(c.embedding, embedding_kind::ngram);
  EXPECT_EQ(c.num_ngram_tables(), 4);  // K * (N - 1) = 2 * 2
  EXPECT_EQ(c.ngram_dim(), 12);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(c.ngram_table_rows(i), 3 * 97 + 2 * i + 1);
  EXPECT_EQ(c.ngram_table_order(0), 2);
  EXPECT_EQ(c.ngram_table_order(3), 3);
  EXPECT_EQ(c.num_router_experts(), 8);
}

TEST(config, released_lite_config_parses) {
  const auto c = load_model_config(std::string(TROUPE_SOURCE_DIR) + "/configs/models/lite-shape.json");
  EXPECT_EQ(c.vocab_size, 131072);
  EXPECT_EQ(c.num_ngram_tables(), 12);
  EXPECT_EQ(c.ngram_dim(), 256);
  EXPECT_EQ(c.ngram_table_rows(0), 78ll * 131072 + 1);
  EXPECT_EQ(c.rope_scaling.type, "yarn");
}

TEST(config, missing_required_field_is_named) {
  const std::string json = test::tiny_config_json(R"("kv_lora_rank": "absent")");
  EXPECT_NE(error_of(json).find("'kv_lora_rank' is missing"), std::string::npos) << error_of(json);
}

TEST(config, wrong_types_and_values_are_named) {
  EXPECT_NE(error_of(test::tiny_config_json("\"moe_topk\": 99")).find("'moe_topk'"), std::string::npos);
  EXPECT_NE(error_of(test::tiny_config_json("\"hidden_size\": 50")).find("'hidden_size'"), std::string::npos);
  const std::string json = test::tiny_config_json(R"("vocab_size": "x")");
  EXPECT_NE(error_of(json).find("'vocab_size' must be an integer"), std::string::npos) << error_of(json);
  EXPECT_NE(error_of("{not json").find("not valid JSON"), std::string::npos);
  EXPECT_NE(error_of(test::tiny_config_json("\"num_hidden_layers\": 3")).find("num_hidden_layers"), std::string::npos);
  EXPECT_NE(error_of(test::tiny_config_json("\"rope_scaling\": {\"rope_type\": \"yarn\"}")).find("'factor'"),
            std::string::npos);
  const std::string arch = test::tiny_config_json(R"("architectures": ["LlamaForCausalLM"])");
  EXPECT_NE(error_of(arch).find("'architectures'"), std::string::npos);
}

TEST(config, defaults_follow_the_reference) {
  const std::string json = test::tiny_config_json(R"("zero_expert_num": "absent")");
  const auto c = parse_model_config(json, "cfg");
  EXPECT_EQ(c.zero_expert_num, 0);
  EXPECT_TRUE(c.mla_scale_q_lora);
  EXPECT_EQ(c.rope_scaling.type, "default");
}

TEST(config, rope_parameters_and_explicit_table_sizes) {
  const std::string json = test::tiny_config_json(
      R"("rope_parameters": {"rope_type": "yarn", "rope_theta": 5000, "factor": 4, "original_max_position_embeddings": 64,
          "mscale": 1, "mscale_all_dim": 1}, "ngram_table_sizes": [301, 307, 311, 313], "rope_theta": "absent")");
  const auto c = parse_model_config(json, "cfg");
  EXPECT_EQ(c.rope_theta, 5000);
  EXPECT_EQ(c.rope_scaling.factor, 4);
  EXPECT_EQ(c.ngram_table_rows(2), 311);
  const auto again = parse_model_config(model_config_to_json(c), "round-trip");
  EXPECT_EQ(again.ngram_table_rows(3), 313);
  EXPECT_EQ(again.rope_scaling.mscale_all_dim, 1);
}

}  // namespace troupe
