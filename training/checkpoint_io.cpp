#include "training/checkpoint_io.hpp"

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "model/json_fields.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe::train {
namespace fs = std::filesystem;
namespace {

tensor to_tensor(const named_array& a, dtype type) {
  tensor t = tensor::empty(a.shape, type);
  if (static_cast<std::size_t>(t.numel()) != a.values.size())
    throw std::logic_error("named array " + a.name + " does not match its shape");
  convert_from_f32(type, a.values.data(), t.raw(), a.values.size());
  return t;
}

named_array from_tensor(const std::string& name, const tensor& t) {
  named_array a{name, t.shape(), std::vector<float>(static_cast<std::size_t>(t.numel()))};
  convert_to_f32(t.type(), t.raw(), a.values.data(), a.values.size());
  return a;
}

void write_text(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw input_error(path.string() + ": write failed (disk full?)");
    }
  }
  fs::rename(tmp, path);
}

std::string state_json(const trainer_state& s) {
  json_writer w;
  w.begin_object();
  w.key("step").value(s.step).key("epoch").value(s.epoch).key("position").value(s.position);
  w.key("tokens_seen").value(s.tokens_seen).key("seed").value(s.seed).key("data_fingerprint").value(s.data_fingerprint);
  w.end_object();
  return w.str() + "\n";
}

trainer_state parse_state(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw input_error(path.string() + ": cannot open (not a training checkpoint?)");
  std::stringstream text;
  text << in.rdbuf();
  simdjson::dom::parser parser;
  simdjson::dom::object obj;
  const simdjson::padded_string padded(text.str());
  if (parser.parse(padded).get_object().get(obj)) throw input_error(path.string() + ": not a JSON object");
  const std::string source = path.string();
  json_fields f{obj, source};
  trainer_state s;
  s.step = f.integer("step");
  s.epoch = f.integer("epoch");
  s.position = f.integer("position");
  s.tokens_seen = f.integer("tokens_seen");
  std::uint64_t u = 0;
  if (f.get("seed").get_uint64().get(u)) f.fail("seed", "must be an unsigned integer");
  s.seed = u;
  if (f.get("data_fingerprint").get_uint64().get(u)) f.fail("data_fingerprint", "must be an unsigned integer");
  s.data_fingerprint = u;
  return s;
}

}  // namespace

std::vector<named_array> values_of(const stage_model<float>& stage) {
  std::vector<named_array> out;
  for (const auto& p : stage.parameters()) out.push_back({p.name, p.shape, p.value});
  return out;
}

void write_model_files(const fs::path& dir, const model_config& config, const std::vector<named_array>& values,
                       dtype type, const fs::path& tokenizer) {
  std::map<std::string, const named_array*> by_name;
  for (const auto& v : values) by_name[v.name] = &v;
  std::vector<std::pair<std::string, tensor>> tensors;
  for (const auto& spec : weight_specs(config)) {
    auto it = by_name.find(spec.name);
    if (it == by_name.end()) throw std::logic_error("write_model_files: no values for " + spec.name);
    if (it->second->shape != spec.shape) throw std::logic_error("write_model_files: shape of " + spec.name);
    tensors.emplace_back(spec.name, to_tensor(*it->second, spec.keep_f32 ? dtype::f32 : type));
  }
  fs::create_directories(dir);
  write_checkpoint(dir, tensors);
  write_text(dir / "config.json", model_config_to_json(config));
  if (!tokenizer.empty()) {
    std::error_code ec;
    fs::copy_file(tokenizer, dir / "tokenizer.json", fs::copy_options::overwrite_existing, ec);
    if (ec) throw input_error((dir / "tokenizer.json").string() + ": cannot write (" + ec.message() + ")");
  }
}

fs::path save_checkpoint(const fs::path& run_dir, const checkpoint_contents& c, dtype model_type, const fs::path& tokenizer) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%06lld", static_cast<long long>(c.state.step));
  const fs::path final_dir = run_dir / "checkpoints" / name;
  const fs::path tmp = final_dir.string() + ".tmp";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    write_model_files(tmp, c.config, c.values, model_type, tokenizer);
    std::vector<std::pair<std::string, tensor>> state;
    for (const auto& v : c.values) state.emplace_back(v.name, to_tensor(v, dtype::f32));
    for (const auto& m : c.moments) state.emplace_back(m.name, to_tensor(m, dtype::f32));
    write_safetensors(tmp / "trainer_state.safetensors", state);
    write_text(tmp / "trainer_state.json", state_json(c.state));
  } catch (const std::exception& e) {
    fs::remove_all(tmp, ec);
    throw input_error("saving checkpoint " + final_dir.string() + " failed: " + e.what() +
                      "; the previous checkpoint is untouched");
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir);
  try {
    write_text(run_dir / "latest", std::string("checkpoints/") + name + "\n");
  } catch (const std::exception& e) {
    throw input_error(std::string("checkpoint saved in ") + final_dir.string() + " but 'latest' could not be updated: " + e.what());
  }
  return final_dir;
}

checkpoint_contents load_checkpoint(const fs::path& dir) {
  checkpoint_contents c;
  c.config = load_model_config(dir);
  c.state = parse_state(dir / "trainer_state.json");
  const auto file = safetensors_file::open(dir / "trainer_state.safetensors");
  for (const auto& [name, entry] : file.entries()) {
    named_array a = from_tensor(name, file.get(name));
    const bool moment = name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq");
    (moment ? c.moments : c.values).push_back(std::move(a));
  }
  return c;
}

std::optional<fs::path> latest_checkpoint(const fs::path& run_dir) {
  std::ifstream in(run_dir / "latest");
  if (!in) return std::nullopt;
  std::string rel;
  std::getline(in, rel);
  if (rel.empty()) return std::nullopt;
  const fs::path dir = run_dir / rel;
  if (!fs::exists(dir / "trainer_state.json"))
    throw input_error((run_dir / "latest").string() + " names " + dir.string() + ", which is not a complete checkpoint");
  return dir;
}

}  // namespace troupe::train
