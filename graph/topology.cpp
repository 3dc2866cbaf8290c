#include "graph/topology.hpp"

#include <simdjson.h>

#include <fstream>
#include <set>
#include <sstream>

#include "model/config.hpp"
#include "protocol/errors.hpp"

namespace troupe {
namespace {

std::vector<std::pair<std::int64_t, std::int64_t>> even_split(std::int64_t total, std::int64_t parts) {
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (std::int64_t i = 0; i < parts; ++i) out.emplace_back(total * i / parts, total * (i + 1) / parts);
  return out;
}

}  // namespace

void validate_speculation(const speculation_setup& s) {
  auto fail = [](const std::string& what) { throw input_error("speculation: " + what); };
  if (s.max_draft_tokens < 1 || s.max_draft_tokens > 64) fail("max_draft_tokens must be between 1 and 64");
  if (s.policy.draft_tokens < 0 || s.policy.draft_tokens > s.max_draft_tokens)
    fail("draft_tokens must be between 0 and max_draft_tokens (" + std::to_string(s.max_draft_tokens) + ")");
  if (s.policy.window < 1) fail("window must be at least 1");
  if (s.policy.retry_after < 0 || s.policy.max_batch < 0) fail("retry_after and max_batch must not be negative");
  if (s.policy.min_acceptance_length < 0) fail("min_acceptance must not be negative");
}

topology local_topology(const model_config& config) {
  topology t;
  t.stage_blocks = even_split(config.num_layers, 1);
  t.shard_experts = even_split(config.n_routed_experts, 1);
  return t;
}

topology parse_topology(std::string_view json, const std::string& source, const model_config& config) {
  auto fail = [&](const std::string& field, const std::string& what) -> void {
    throw input_error(source + ": field '" + field + "' " + what);
  };
  simdjson::dom::parser parser;
  simdjson::padded_string text(json);
  simdjson::dom::object root;
  if (auto err = parser.parse(text).get_object().get(root))
    throw input_error(source + ": not a JSON object (" + simdjson::error_message(err) + ")");
  static const std::set<std::string> known = {"name", "stages", "stage_blocks", "expert_shards", "remote_expert_shards",
                                              "threads", "scheduler", "speculation"};
  for (auto [key, value] : root)
    if (!known.count(std::string(key))) fail(std::string(key), "is not a topology field");
  topology t = local_topology(config);
  std::string_view name;
  if (!root["name"].get_string().get(name)) t.name = std::string(name);
  auto integer = [&](simdjson::dom::object o, const char* key, std::int64_t fallback, const std::string& field) {
    simdjson::dom::element e;
    if (o[key].get(e)) return fallback;
    std::int64_t v;
    if (e.get_int64().get(v)) fail(field, "must be an integer");
    return v;
  };
  const std::int64_t stages = integer(root, "stages", 1, "stages");
  if (stages < 1 || stages > config.num_layers)
    fail("stages", "must be between 1 and num_layers (" + std::to_string(config.num_layers) + ")");
  t.stage_blocks = even_split(config.num_layers, stages);
  simdjson::dom::array blocks;
  if (!root["stage_blocks"].get_array().get(blocks)) {
    t.stage_blocks.clear();
    std::int64_t expect = 0;
    for (auto b : blocks) {
      simdjson::dom::array pair;
      std::int64_t first, last;
      if (b.get_array().get(pair) || pair.size() != 2 || pair.at(0).get_int64().get(first) || pair.at(1).get_int64().get(last))
        fail("stage_blocks", "must be a list of [first, last) block ranges");
      if (first != expect || last <= first)
        fail("stage_blocks", "ranges must be contiguous and non-empty from block 0; got [" + std::to_string(first) + ", " +
                                 std::to_string(last) + ") where block " + std::to_string(expect) + " comes next");
      t.stage_blocks.emplace_back(first, last);
      expect = last;
    }
    if (expect != config.num_layers)
      fail("stage_blocks", "covers blocks [0, " + std::to_string(expect) + ") but the model has " +
                               std::to_string(config.num_layers));
  }
  const std::int64_t shards = integer(root, "expert_shards", 1, "expert_shards");
  if (shards < 1 || shards > config.n_routed_experts)
    fail("expert_shards", "must be between 1 and n_routed_experts (" + std::to_string(config.n_routed_experts) + ")");
  t.shard_experts = even_split(config.n_routed_experts, shards);
  simdjson::dom::array remotes;
  if (!root["remote_expert_shards"].get_array().get(remotes)) {
    std::set<std::int64_t> seen;
    for (auto r : remotes) {
      simdjson::dom::object o;
      std::string_view endpoint;
      if (r.get_object().get(o) || o["endpoint"].get_string().get(endpoint))
        fail("remote_expert_shards", "entries need \"shard\" and \"endpoint\": \"host:port\"");
      remote_shard rs;
      rs.shard = integer(o, "shard", -1, "remote_expert_shards.shard");
      if (rs.shard < 0 || rs.shard >= shards || !seen.insert(rs.shard).second)
        fail("remote_expert_shards.shard", "must name a distinct shard in [0, " + std::to_string(shards) + ")");
      const auto colon = endpoint.rfind(':');
      long port = 0;
      try {
        port = colon == std::string_view::npos ? 0 : std::stol(std::string(endpoint.substr(colon + 1)));
      } catch (const std::exception&) {
        port = 0;
      }
      if (colon == std::string_view::npos || port <= 0 || port > 65535)
        fail("remote_expert_shards.endpoint", "'" + std::string(endpoint) + "' is not host:port");
      rs.host = std::string(endpoint.substr(0, colon));
      rs.port = static_cast<std::uint16_t>(port);
      t.remote_shards.push_back(rs);
    }
  }
  t.threads = static_cast<int>(integer(root, "threads", 0, "threads"));
  simdjson::dom::object sched;
  if (!root["scheduler"].get_object().get(sched)) {
    t.max_waiting = integer(sched, "max_waiting", t.max_waiting, "scheduler.max_waiting");
    t.max_running = integer(sched, "max_running", t.max_running, "scheduler.max_running");
    t.kv_block_tokens = integer(sched, "kv_block_tokens", t.kv_block_tokens, "scheduler.kv_block_tokens");
    t.kv_blocks = integer(sched, "kv_blocks", t.kv_blocks, "scheduler.kv_blocks");
    t.timeout = std::chrono::milliseconds(integer(sched, "step_timeout_ms", t.timeout.count(), "scheduler.step_timeout_ms"));
    t.micro_batches = integer(sched, "micro_batches", 0, "scheduler.micro_batches");
    t.heartbeat = std::chrono::milliseconds(integer(sched, "heartbeat_ms", t.heartbeat.count(), "scheduler.heartbeat_ms"));
    for (auto [key, value] : sched) {
      static const std::set<std::string> fields = {"max_waiting", "max_running", "kv_block_tokens", "kv_blocks",
                                                   "step_timeout_ms", "micro_batches", "heartbeat_ms"};
      if (!fields.count(std::string(key))) fail("scheduler." + std::string(key), "is not a scheduler field");
    }
    if (t.max_waiting < 0 || t.max_running < 1 || t.kv_block_tokens < 1 || t.kv_blocks < 1 || t.timeout.count() < 1 ||
        t.micro_batches < 0 || t.heartbeat.count() < 1)
      fail("scheduler", "limits must be positive");
  }
  simdjson::dom::object spec;
  if (!root["speculation"].get_object().get(spec)) {
    static const std::set<std::string> fields = {"draft", "draft_tokens", "max_draft_tokens", "min_acceptance",
                                                 "window", "retry_after", "max_batch"};
    for (auto [key, value] : spec)
      if (!fields.count(std::string(key))) fail("speculation." + std::string(key), "is not a speculation field");
    auto& s = t.speculation;
    std::string_view draft;
    if (spec["draft"].get_string().get(draft)) fail("speculation.draft", "must name the draft model directory");
    s.draft = std::string(draft);
    s.policy.draft_tokens = integer(spec, "draft_tokens", s.policy.draft_tokens, "speculation.draft_tokens");
    s.max_draft_tokens = integer(spec, "max_draft_tokens", s.max_draft_tokens, "speculation.max_draft_tokens");
    s.policy.window = integer(spec, "window", s.policy.window, "speculation.window");
    s.policy.retry_after = integer(spec, "retry_after", s.policy.retry_after, "speculation.retry_after");
    s.policy.max_batch = integer(spec, "max_batch", s.policy.max_batch, "speculation.max_batch");
    simdjson::dom::element e;
    if (!spec["min_acceptance"].get(e) && e.get_double().get(s.policy.min_acceptance_length))
      fail("speculation.min_acceptance", "must be a number");
    validate_speculation(s);
  }
  return t;
}

topology load_topology(const std::filesystem::path& path, const model_config& config) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw input_error(path.string() + ": cannot open the topology file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_topology(ss.str(), path.string(), config);
}

}  // namespace troupe
