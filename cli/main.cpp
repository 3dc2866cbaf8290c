// The `troupe` command line: one binary, one subcommand per job. Each subcommand lives in its
// own file and registers itself here; errors in user input end with a one-line message and
// exit code 2, bugs with exit code 1.
#include <CLI/CLI.hpp>

#include <csignal>
#include <iostream>

#include "cli/commands.hpp"
#include "protocol/errors.hpp"

int main(int argc, char** argv) {
  // Writes past a file-size limit fail with EFBIG (and get a clear error) instead of killing us.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"troupe: serve and train n-gram-embedding MoE language models (LongCat-Flash-Lite family)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("troupe ") + TROUPE_VERSION);
  std::function<int()> run;
  troupe::cli::add_model_commands(app, run);
  troupe::cli::add_tokenizer_commands(app, run);
  troupe::cli::add_ngram_plan_command(app, run);
  troupe::cli::add_graph_commands(app, run);
  troupe::cli::add_train_commands(app, run);
  troupe::cli::add_distill_command(app, run);
  troupe::cli::add_chat_command(app, run);
  troupe::cli::add_draft_command(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run();
  } catch (const troupe::input_error& e) {
    std::cerr << "troupe: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "troupe: internal error: " << e.what() << "\n";
    return 1;
  }
}
