// The gateway's Prometheus metrics: counters and histograms it updates as requests flow, plus
// the scheduler's gauges read at scrape time, rendered in the Prometheus text format.
// Thread-safe: Asio threads and CAF actors update it concurrently.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "protocol/messages.hpp"

namespace troupe::gateway {

class histogram {
 public:
  explicit histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  /// Prometheus lines for `name` (cumulative buckets, sum, count).
  void render(std::string& out, const std::string& name) const;

 private:
  std::vector<double> bounds_;
  std::vector<std::uint64_t> counts_;
  double sum_ = 0;
  std::uint64_t count_ = 0;
};

class gateway_metrics {
 public:
  gateway_metrics();
  void request_finished(const std::string& outcome);  // outcome: eos, length, stop, cancelled, error, rejected
  void tokens(std::int64_t prompt, std::int64_t completion);
  void time_to_first_token(double seconds);
  void inter_token(double seconds);
  /// A finished request's speculation (nothing when it never drafted).
  void speculation(const request_done& done);
  void connection_opened();
  void connection_closed();
  /// The whole exposition, with the scheduler's gauges.
  std::string render(const scheduler_metrics& s) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::uint64_t> requests_;
  std::uint64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  std::int64_t connections_ = 0;
  histogram ttft_, itl_, acceptance_;
};

}  // namespace troupe::gateway
