#include "model/npy.hpp"

#include <fstream>
#include <sstream>

#include "protocol/errors.hpp"

namespace troupe {
namespace {

const char* descr(dtype t) {
  switch (t) {
    case dtype::f32: return "<f4";
    case dtype::f16: return "<f2";
    case dtype::i32: return "<i4";
    case dtype::i64: return "<i8";
    case dtype::bf16: break;
  }
  throw input_error("write_npy: NumPy has no bf16; convert to f32 first");
}

}  // namespace

void write_npy(const std::filesystem::path& path, const tensor& t) {
  std::ostringstream shape;
  shape << '(';
  for (auto d : t.shape()) shape << d << ',';
  if (t.rank() > 1) shape.seekp(-1, std::ios::cur), shape << ' ';
  shape << ')';
  std::string header = std::string("{'descr': '") + descr(t.type()) + "', 'fortran_order': False, 'shape': " +
                       shape.str() + ", }";
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw input_error(path.string() + ": cannot create");
  const char magic[] = "\x93NUMPY\x01\x00";
  out.write(magic, 8);
  const auto len = static_cast<std::uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out << header;
  out.write(static_cast<const char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  if (!out) throw input_error(path.string() + ": write failed");
}

tensor read_npy(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw input_error(path.string() + ": cannot open");
  char magic[8];
  std::uint16_t len = 0;
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(&len), 2);
  if (!in || std::string(magic, 6) != "\x93NUMPY" || magic[6] != 1) throw input_error(path.string() + ": not a .npy v1 file");
  std::string header(len, '\0');
  in.read(header.data(), len);
  dtype type;
  if (header.find("'<f4'") != std::string::npos) type = dtype::f32;
  else if (header.find("'<i4'") != std::string::npos) type = dtype::i32;
  else if (header.find("'<i8'") != std::string::npos) type = dtype::i64;
  else throw input_error(path.string() + ": only <f4, <i4 and <i8 arrays are read");
  if (header.find("'fortran_order': False") == std::string::npos) throw input_error(path.string() + ": Fortran order");
  const auto open = header.find('('), close = header.find(')');
  shape_t shape;
  std::istringstream dims(header.substr(open + 1, close - open - 1));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(d));
  tensor t = tensor::empty(shape, type);
  in.read(static_cast<char*>(t.raw()), static_cast<std::streamsize>(t.nbytes()));
  if (!in) throw input_error(path.string() + ": truncated");
  return t;
}

}  // namespace troupe
