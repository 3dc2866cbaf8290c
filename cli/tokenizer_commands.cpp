// `troupe tokenize` and `troupe detokenize`.
#include <CLI/CLI.hpp>
#include <simdjson.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>

#include "cli/commands.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/bpe_trainer.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::cli {
namespace {

std::string read_stdin() {
  std::cin >> std::noskipws;
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

}  // namespace

void add_tokenizer_commands(CLI::App& app, std::function<int()>& run) {
  struct options {
    std::string tokenizer;
    bool parse_special = false;
  };
  auto opts = std::make_shared<options>();

  auto* tok = app.add_subcommand("tokenize", "Read text on stdin, print its token ids as one JSON array");
  tok->add_option("--tokenizer", opts->tokenizer, "tokenizer.json (Hugging Face) or tiktoken rank file (.json)")
      ->required()->check(CLI::ExistingFile);
  tok->add_flag("--special", opts->parse_special,
                "Turn special-token text such as <|endoftext|> into its id (default: encode it as plain text)");
  tok->callback([&run, opts] {
    run = [opts] {
      const tokenizer t = tokenizer::load(opts->tokenizer);
      const auto ids = t.encode(read_stdin(), opts->parse_special ? special_tokens::parse : special_tokens::as_text);
      std::string out = "[";
      for (std::size_t i = 0; i < ids.size(); ++i) {
        if (i) out += ',';
        out += std::to_string(ids[i]);
      }
      std::cout << out << "]\n";
      return 0;
    };
  });

  struct train_opts {
    std::vector<std::string> corpus;
    std::string out;
    bpe_training_options options;
  };
  auto to = std::make_shared<train_opts>();
  auto* train = app.add_subcommand("train-tokenizer", "Train a byte-level BPE tokenizer on text files (writes tokenizer.json)");
  train->add_option("--corpus", to->corpus, "text files to learn from")->required()->check(CLI::ExistingFile);
  train->add_option("--out", to->out, "output tokenizer.json")->required();
  train->add_option("--vocab-size", to->options.vocab_size, "3 specials + 256 bytes + merges")->capture_default_str();
  train->add_option("--max-bytes", to->options.max_bytes, "read at most this many bytes per file (0 = all)")
      ->capture_default_str();
  train->callback([&run, to] {
    run = [to] {
      std::vector<std::filesystem::path> files(to->corpus.begin(), to->corpus.end());
      const std::string json = train_bpe(files, to->options);
      std::ofstream out(to->out, std::ios::binary | std::ios::trunc);
      out << json;
      if (!out) throw input_error(to->out + ": write failed");
      return 0;
    };
  });

  auto* detok = app.add_subcommand("detokenize", "Read a JSON array of token ids on stdin, print the text");
  detok->add_option("--tokenizer", opts->tokenizer, "tokenizer.json or tiktoken rank file")
      ->required()->check(CLI::ExistingFile);
  detok->callback([&run, opts] {
    run = [opts] {
      const tokenizer t = tokenizer::load(opts->tokenizer);
      simdjson::dom::parser parser;
      simdjson::padded_string input(read_stdin());
      simdjson::dom::array arr;
      if (parser.parse(input).get_array().get(arr)) throw input_error("stdin: expected a JSON array of token ids");
      std::vector<std::int32_t> ids;
      for (auto v : arr) {
        std::int64_t id;
        if (v.get_int64().get(id) || id < 0 || id > INT32_MAX)
          throw input_error("stdin: token ids must be non-negative 32-bit integers");
        ids.push_back(static_cast<std::int32_t>(id));
      }
      std::cout << t.decode(ids);
      return 0;
    };
  });
}

}  // namespace troupe::cli
