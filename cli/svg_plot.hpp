// Line charts as SVG files (viewable in any browser; `rsvg-convert` makes a PNG): one or more
// panels side by side, each with axes, ticks, labelled series and a legend. Used by
// `ngram-plan --plot` and, later, `troupe plot` for loss curves.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace troupe::cli {

struct plot_series {
  std::string label;
  std::string color;  // any SVG color
  std::vector<std::pair<double, double>> points;
  bool dashed = false;
};

struct plot_panel {
  std::string title, x_label, y_label;
  std::vector<plot_series> series;
};

/// Writes the panels in a row; throws input_error if the file cannot be written.
void write_svg_plot(const std::filesystem::path& path, const std::string& title, const std::vector<plot_panel>& panels);

}  // namespace troupe::cli
