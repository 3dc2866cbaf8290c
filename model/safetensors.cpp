#include "model/safetensors.hpp"

#include <fcntl.h>
#include <simdjson.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe {
namespace fs = std::filesystem;
namespace {

constexpr std::uint64_t max_header_bytes = 100ull << 20;

[[noreturn]] void fail(const fs::path& path, const std::string& what) { throw input_error(path.string() + ": " + what); }

struct mapped_file {
  void* addr = nullptr;
  std::size_t size = 0;
  ~mapped_file() {
    if (addr && size) munmap(addr, size);
  }
};

std::shared_ptr<mapped_file> map_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open (") + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, "cannot stat");
  }
  auto m = std::make_shared<mapped_file>();
  m->size = static_cast<std::size_t>(st.st_size);
  if (m->size > 0) {
    m->addr = mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m->addr == MAP_FAILED) {
      m->addr = nullptr;
      ::close(fd);
      fail(path, std::string("cannot map (") + std::strerror(errno) + ")");
    }
  }
  ::close(fd);
  return m;
}

}  // namespace

safetensors_file safetensors_file::open(const fs::path& path) {
  auto m = map_file(path);
  if (m->size < 8) fail(path, "truncated: " + std::to_string(m->size) + " bytes, not even a header length");
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, m->addr, 8);  // little-endian on every platform Troupe builds for
  if (header_len > max_header_bytes || 8 + header_len > m->size)
    fail(path, "corrupt header: header length " + std::to_string(header_len) + " exceeds the file size " +
                   std::to_string(m->size));
  const auto* bytes = static_cast<const char*>(m->addr);
  simdjson::dom::parser parser;
  simdjson::padded_string header(bytes + 8, header_len);
  simdjson::dom::object root;
  if (auto err = parser.parse(header).get_object().get(root))
    fail(path, std::string("corrupt header: ") + simdjson::error_message(err));

  safetensors_file f;
  f.path_ = path;
  f.data_ = reinterpret_cast<const std::byte*>(bytes + 8 + header_len);
  const std::uint64_t data_size = m->size - 8 - header_len;
  for (auto [key, value] : root) {
    if (key == "__metadata__") continue;
    safetensors_entry e;
    e.name = std::string(key);
    const std::string where = "corrupt header: tensor '" + e.name + "' ";
    simdjson::dom::object o;
    std::string_view dt;
    simdjson::dom::array shape, offsets;
    if (value.get_object().get(o) || o["dtype"].get_string().get(dt) || o["shape"].get_array().get(shape) ||
        o["data_offsets"].get_array().get(offsets) || offsets.size() != 2)
      fail(path, where + "needs dtype, shape and data_offsets [begin, end]");
    e.dtype_name = std::string(dt);
    e.supported = dtype_from_safetensors_name(dt, e.type);
    for (auto d : shape) {
      std::int64_t v;
      if (d.get_int64().get(v) || v < 0) fail(path, where + "has a bad shape");
      e.shape.push_back(v);
    }
    if (offsets.at(0).get_uint64().get(e.begin) || offsets.at(1).get_uint64().get(e.end) || e.end < e.begin)
      fail(path, where + "has bad data_offsets");
    if (e.end > data_size)
      fail(path, "truncated: tensor '" + e.name + "' ends at byte " + std::to_string(e.end) + " of the data section, which has " +
                     std::to_string(data_size) + " bytes");
    if (e.supported) {
      std::uint64_t n = 1;
      for (auto d : e.shape) n *= static_cast<std::uint64_t>(d);
      if (n * dtype_size(e.type) != e.end - e.begin)
        fail(path, where + "holds " + std::to_string(e.end - e.begin) + " bytes, but " + e.dtype_name + " " +
                       shape_to_string(e.shape) + " needs " + std::to_string(n * dtype_size(e.type)));
    }
    f.entries_.emplace(e.name, std::move(e));
  }
  f.mapping_ = std::move(m);
  return f;
}

tensor safetensors_file::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) fail(path_, "no tensor named '" + name + "'");
  const auto& e = it->second;
  if (!e.supported) fail(path_, "tensor '" + name + "' has dtype " + e.dtype_name + ", which Troupe does not read");
  if (e.begin % dtype_size(e.type))
    fail(path_, "tensor '" + name + "' is not aligned to its element size");
  return tensor::view(mapping_, const_cast<std::byte*>(data_ + e.begin), e.shape, e.type);
}

checkpoint checkpoint::open(const fs::path& dir) {
  checkpoint c;
  c.dir_ = dir;
  if (!fs::is_directory(dir)) fail(dir, "not a model directory");
  const fs::path index = dir / "model.safetensors.index.json";
  std::vector<fs::path> files;
  std::map<std::string, std::string> index_map;
  if (fs::exists(index)) {
    simdjson::dom::parser parser;
    simdjson::padded_string text;
    if (simdjson::padded_string::load(index.string()).get(text)) fail(index, "cannot read the index");
    simdjson::dom::object map;
    if (parser.parse(text)["weight_map"].get_object().get(map)) fail(index, "corrupt index: needs a weight_map object");
    std::set<std::string> names;
    for (auto [k, v] : map) {
      std::string_view file;
      if (v.get_string().get(file)) fail(index, "corrupt index: weight_map values must be file names");
      if (fs::path(file).has_parent_path()) fail(index, "weight_map names a file outside the directory: " + std::string(file));
      index_map.emplace(std::string(k), std::string(file));
      names.insert(std::string(file));
    }
    for (const auto& n : names) files.push_back(dir / n);
  } else if (fs::exists(dir / "model.safetensors")) {
    files.push_back(dir / "model.safetensors");
  } else {
    fail(dir, "no model.safetensors and no model.safetensors.index.json");
  }
  for (const auto& f : files) {
    if (!fs::exists(f)) fail(f, "listed in the index but missing");
    c.files_.push_back(safetensors_file::open(f));
    for (const auto& [name, _] : c.files_.back().entries()) c.where_[name] = c.files_.size() - 1;
  }
  for (const auto& [name, file] : index_map) {
    auto it = c.where_.find(name);
    if (it == c.where_.end() || c.files_[it->second].path().filename() != file)
      fail(dir / file, "the index lists tensor '" + name + "' here, but the file does not hold it");
  }
  return c;
}

std::vector<std::string> checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

fs::path checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? dir_ : files_[it->second].path();
}

tensor checkpoint::get(const std::string& name, const shape_t& expected_shape) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail(dir_, "missing tensor '" + name + "' (expected shape " + shape_to_string(expected_shape) + ")");
  tensor t = files_[it->second].get(name);
  if (t.shape() != expected_shape)
    fail(files_[it->second].path(), "tensor '" + name + "' has shape " + shape_to_string(t.shape()) + ", expected " +
                                        shape_to_string(expected_shape));
  if (t.type() != dtype::f32 && t.type() != dtype::bf16 && t.type() != dtype::f16)
    fail(files_[it->second].path(), "tensor '" + name + "' has dtype " + std::string(dtype_name(t.type())) +
                                        ", expected a float type (bf16, f16 or f32)");
  return t;
}

namespace {

void write_file(const fs::path& path, const std::vector<const std::pair<std::string, tensor>*>& tensors) {
  json_writer w;
  w.begin_object();
  w.key("__metadata__").begin_object().key("format").value("pt").end_object();
  std::uint64_t offset = 0;
  for (const auto* t : tensors) {
    w.key(t->first).begin_object();
    w.key("dtype").value(dtype_safetensors_name(t->second.type()));
    w.key("shape").begin_array();
    for (auto d : t->second.shape()) w.value(d);
    w.end_array();
    w.key("data_offsets").begin_array().value(offset).value(offset + t->second.nbytes()).end_array();
    w.end_object();
    offset += t->second.nbytes();
  }
  w.end_object();
  std::string header = w.str();
  header.append((8 - header.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(tmp, "cannot create");
    const std::uint64_t len = header.size();
    out.write(reinterpret_cast<const char*>(&len), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto* t : tensors) {
      if (t->second.where().kind != device_kind::cpu) fail(path, "tensor '" + t->first + "' is not on the host");
      out.write(static_cast<const char*>(t->second.raw()), static_cast<std::streamsize>(t->second.nbytes()));
    }
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      fs::remove(tmp, ec);
      fail(path, "write failed (disk full?); nothing was replaced");
    }
  }
  fs::rename(tmp, path);
}

}  // namespace

void write_safetensors(const fs::path& path, const std::vector<std::pair<std::string, tensor>>& tensors) {
  std::vector<const std::pair<std::string, tensor>*> all;
  for (const auto& t : tensors) all.push_back(&t);
  write_file(path, all);
}

void write_checkpoint(const fs::path& dir, const std::vector<std::pair<std::string, tensor>>& tensors,
                      std::uint64_t max_shard_bytes) {
  fs::create_directories(dir);
  std::vector<std::vector<const std::pair<std::string, tensor>*>> shards(1);
  std::uint64_t shard_bytes = 0, total = 0;
  for (const auto& t : tensors) {
    if (shard_bytes > 0 && shard_bytes + t.second.nbytes() > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&t);
    shard_bytes += t.second.nbytes();
    total += t.second.nbytes();
  }
  if (shards.size() == 1) {
    write_file(dir / "model.safetensors", shards[0]);
    std::error_code ec;
    fs::remove(dir / "model.safetensors.index.json", ec);
    return;
  }
  json_writer index;
  index.begin_object();
  index.key("metadata").begin_object().key("total_size").value(total).end_object();
  index.key("weight_map").begin_object();
  for (std::size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    write_file(dir / name, shards[s]);
    for (const auto* t : shards[s]) index.key(t->first).value(name);
  }
  index.end_object().end_object();
  const fs::path tmp = dir / "model.safetensors.index.json.tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << index.str() << "\n";
    if (!out) fail(tmp, "write failed");
  }
  fs::rename(tmp, dir / "model.safetensors.index.json");
  std::error_code ec;
  fs::remove(dir / "model.safetensors", ec);
}

}  // namespace troupe
