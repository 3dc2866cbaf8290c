#include "cli/svg_plot.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "protocol/errors.hpp"

namespace troupe::cli {
namespace {

constexpr double panel_w = 520, panel_h = 380, margin_l = 70, margin_r = 20, margin_t = 60, margin_b = 55;

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

// About five round tick values covering [lo, hi].
std::vector<double> ticks(double lo, double hi) {
  const double span = hi - lo;
  const double raw = span / 5;
  const double mag = std::pow(10, std::floor(std::log10(raw)));
  const double step = raw / mag < 2 ? 2 * mag : raw / mag < 5 ? 5 * mag : 10 * mag;
  std::vector<double> out;
  for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push_back(v);
  return out;
}

}  // namespace

void write_svg_plot(const std::filesystem::path& path, const std::string& title, const std::vector<plot_panel>& panels) {
  std::ostringstream svg;
  const double width = panel_w * static_cast<double>(std::max<std::size_t>(1, panels.size()));
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << panel_h + 30
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n";
  svg << "<text x='" << width / 2 << "' y='20' text-anchor='middle' font-size='15'>" << escape(title) << "</text>\n";
  for (std::size_t p = 0; p < panels.size(); ++p) {
    const auto& panel = panels[p];
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (const auto& s : panel.series)
      for (auto [x, y] : s.points) {
        x0 = std::min(x0, x), x1 = std::max(x1, x);
        y0 = std::min(y0, y), y1 = std::max(y1, y);
      }
    if (!(x1 > x0)) x1 = x0 + 1;
    y0 = std::min(y0, 0.0);
    if (!(y1 > y0)) y1 = y0 + 1;
    y1 += 0.05 * (y1 - y0);
    const double left = panel_w * static_cast<double>(p) + margin_l, top = 30 + margin_t;
    const double w = panel_w - margin_l - margin_r, h = panel_h - margin_t - margin_b;
    auto sx = [&](double x) { return left + (x - x0) / (x1 - x0) * w; };
    auto sy = [&](double y) { return top + h - (y - y0) / (y1 - y0) * h; };
    svg << "<text x='" << left + w / 2 << "' y='" << top - 22 << "' text-anchor='middle' font-size='13'>"
        << escape(panel.title) << "</text>\n";
    svg << "<rect x='" << left << "' y='" << top << "' width='" << w << "' height='" << h
        << "' fill='none' stroke='#444'/>\n";
    for (double t : ticks(x0, x1))
      svg << "<line x1='" << sx(t) << "' x2='" << sx(t) << "' y1='" << top << "' y2='" << top + h
          << "' stroke='#ddd'/><text x='" << sx(t) << "' y='" << top + h + 16 << "' text-anchor='middle'>" << fmt(t)
          << "</text>\n";
    for (double t : ticks(y0, y1))
      svg << "<line x1='" << left << "' x2='" << left + w << "' y1='" << sy(t) << "' y2='" << sy(t)
          << "' stroke='#ddd'/><text x='" << left - 6 << "' y='" << sy(t) + 4 << "' text-anchor='end'>" << fmt(t)
          << "</text>\n";
    svg << "<text x='" << left + w / 2 << "' y='" << top + h + 40 << "' text-anchor='middle'>" << escape(panel.x_label)
        << "</text>\n";
    svg << "<text transform='translate(" << left - 50 << "," << top + h / 2 << ") rotate(-90)' text-anchor='middle'>"
        << escape(panel.y_label) << "</text>\n";
    for (std::size_t s = 0; s < panel.series.size(); ++s) {
      const auto& series = panel.series[s];
      svg << "<polyline fill='none' stroke='" << series.color << "' stroke-width='1.3'"
          << (series.dashed ? " stroke-dasharray='5,3'" : "") << " points='";
      for (auto [x, y] : series.points) svg << fmt(sx(x)) << ',' << fmt(sy(y)) << ' ';
      svg << "'/>\n";
      const double ly = top + 14 + 16 * static_cast<double>(s);
      svg << "<line x1='" << left + 10 << "' x2='" << left + 34 << "' y1='" << ly << "' y2='" << ly << "' stroke='"
          << series.color << "' stroke-width='2'" << (series.dashed ? " stroke-dasharray='5,3'" : "") << "/>"
          << "<text x='" << left + 40 << "' y='" << ly + 4 << "'>" << escape(series.label) << "</text>\n";
    }
  }
  svg << "</svg>\n";
  std::ofstream out(path, std::ios::trunc);
  out << svg.str();
  if (!out) throw input_error(path.string() + ": cannot write the plot");
}

}  // namespace troupe::cli
