// Registration of the CLI's subcommands. Each add_* function adds its subcommands to `app`
// and, when one is chosen, sets `run` to the function that executes it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace troupe {
class tokenizer;
struct generation_params;
}  // namespace troupe

namespace troupe::cli {

void add_model_commands(CLI::App& app, std::function<int()>& run);
void add_tokenizer_commands(CLI::App& app, std::function<int()>& run);
void add_ngram_plan_command(CLI::App& app, std::function<int()>& run);
void add_graph_commands(CLI::App& app, std::function<int()>& run);
void add_chat_command(CLI::App& app, std::function<int()>& run);
void add_draft_command(CLI::App& app, std::function<int()>& run);
void add_train_commands(CLI::App& app, std::function<int()>& run);
void add_distill_command(CLI::App& app, std::function<int()>& run);

/// Runs one request through the actor graph of `topology_spec` ("local" or a topology file),
/// streaming its text to stdout; computing on `device` (gpu/make_backend); returns the exit status.
int generate_with_graph(const std::string& model_dir, const std::string& topology_spec, const tokenizer& tok,
                        const std::vector<std::int32_t>& prompt, const generation_params& params, int threads,
                        const std::string& device);

}  // namespace troupe::cli
