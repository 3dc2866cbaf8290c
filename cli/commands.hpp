// Registration of the CLI's subcommands. Each add_* function adds its subcommands to `app`
// and, when one is chosen, sets `run` to the function that executes it.
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace troupe::cli {

void add_model_commands(CLI::App& app, std::function<int()>& run);
void add_tokenizer_commands(CLI::App& app, std::function<int()>& run);
void add_ngram_plan_command(CLI::App& app, std::function<int()>& run);

}  // namespace troupe::cli
